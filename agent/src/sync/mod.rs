//! Desired state: where it comes from and how it reaches the rest of the agent.
//!
//! With etcd endpoints configured, the [`etcd`] source lists and watches the prefix; without
//! them the agent runs standalone from a local directory ([`mod@file`]). Either way every
//! change goes through one [`Applier`], which keeps the [`Snapshot`], derives the node's
//! [`DesiredState`], publishes it whole through a watch channel, reports it in the status and
//! hands the snapshot to the offline [`cache`] writer.

pub mod cache;
pub mod etcd;
pub mod file;
pub mod node_status;
pub mod snapshot;
pub mod state;

use std::sync::Arc;

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;

pub use cache::CacheConfig;
pub use etcd::EtcdConfig;
pub use file::StandaloneConfig;
pub use snapshot::{Change, Entry, Snapshot};
pub use state::{Deriver, DesiredState, DesiredStateRx};

use crate::status::{ConfigSource, StatusHandle};

/// Counters of the sync component, shared by its tasks.
#[derive(Clone, Default)]
pub struct SyncMetrics {
    applied_revision: Gauge,
    changes: Counter,
    rejected: Gauge,
    relists: Counter,
    reconnects: Counter,
    cache_writes: Counter,
    cache_write_errors: Counter,
    status_writes: Counter,
}

impl SyncMetrics {
    /// Registers the counters.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("edgeward_sync");
        r.register(
            "applied_revision",
            "etcd revision of the applied snapshot",
            m.applied_revision.clone(),
        );
        r.register("changes", "key changes applied", m.changes.clone());
        r.register(
            "rejected_documents",
            "documents whose current value was rejected",
            m.rejected.clone(),
        );
        r.register(
            "relists",
            "full lists of the prefix (start, compaction)",
            m.relists.clone(),
        );
        r.register(
            "reconnects",
            "etcd connection or watch failures followed by a retry",
            m.reconnects.clone(),
        );
        r.register(
            "cache_writes",
            "offline cache files written",
            m.cache_writes.clone(),
        );
        r.register(
            "cache_write_errors",
            "offline cache writes that failed",
            m.cache_write_errors.clone(),
        );
        r.register(
            "status_writes",
            "node status documents written to etcd",
            m.status_writes.clone(),
        );
        m
    }
}

/// Applies snapshots and changes, and makes them visible to the rest of the agent.
pub struct Applier {
    snapshot: Snapshot,
    deriver: Deriver,
    tx: watch::Sender<Arc<DesiredState>>,
    cache: Option<watch::Sender<Option<Arc<Snapshot>>>>,
    pub(crate) status: StatusHandle,
    pub(crate) metrics: SyncMetrics,
    source: Option<ConfigSource>,
}

impl Applier {
    /// An applier for `node` under `prefix`, publishing on `tx`.
    pub fn new(
        prefix: &str,
        node: &str,
        tx: watch::Sender<Arc<DesiredState>>,
        status: StatusHandle,
        metrics: SyncMetrics,
    ) -> Self {
        Self {
            snapshot: Snapshot::default(),
            deriver: Deriver::new(prefix, node),
            tx,
            cache: None,
            status,
            metrics,
            source: None,
        }
    }

    /// Hands every applied snapshot to the cache writer on `tx`.
    pub fn with_cache(mut self, tx: watch::Sender<Option<Arc<Snapshot>>>) -> Self {
        self.cache = Some(tx);
        self
    }

    /// The revision of the applied snapshot (0 before anything).
    pub fn revision(&self) -> i64 {
        self.snapshot.revision
    }

    /// Whether anything has been applied.
    pub fn has_applied(&self) -> bool {
        self.source.is_some()
    }

    /// Replaces the whole snapshot (a list or relist, a cache load, a directory read) by
    /// applying the difference, so that deletes are seen too.
    pub fn reset(&mut self, snapshot: Snapshot, source: ConfigSource) {
        let changes = self.snapshot.diff(&snapshot);
        self.metrics.changes.inc_by(changes.len() as u64);
        self.snapshot.apply(&changes, snapshot.revision);
        // A relist may stand at a lower revision only if etcd itself went back (a restore);
        // etcd is the truth then.
        self.snapshot.revision = snapshot.revision;
        self.publish(source);
    }

    /// Applies the changes of one watch response, standing at `revision`.
    pub fn apply(&mut self, changes: &[Change], revision: i64, source: ConfigSource) {
        let applied = self.snapshot.apply(changes, revision);
        self.metrics.changes.inc_by(applied as u64);
        self.publish(source);
    }

    /// Records that everything up to `revision` has been seen (a progress notification).
    pub fn progress(&mut self, revision: i64) {
        if revision > self.snapshot.revision {
            self.snapshot.revision = revision;
            if let Some(source) = self.source {
                self.publish(source);
            }
        }
    }

    fn publish(&mut self, source: ConfigSource) {
        let derived = self.deriver.derive(&self.snapshot, source);
        let revision = derived.state.revision;
        self.metrics.applied_revision.set(revision);
        self.metrics.rejected.set(derived.rejected.len() as i64);
        self.tx.send_replace(Arc::new(derived.state));
        self.status.config_applied(source, revision);
        self.status.update(|s| s.config.rejected = derived.rejected);
        if source != ConfigSource::Cache
            && let Some(cache) = &self.cache
        {
            cache.send_replace(Some(Arc::new(self.snapshot.clone())));
        }
        if self.source != Some(source) {
            tracing::info!(source = ?source, revision, "configuration source");
        }
        self.source = Some(source);
    }
}
