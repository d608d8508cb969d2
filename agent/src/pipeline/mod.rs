//! The pipeline from the probe to the exporters: enrichment, batching, the plugin chain.
//!
//! Every hop is a bounded channel; when one is full the sender drops and counts, so nothing
//! ever blocks the probe's ring-buffer reader. Events arrive in batches ([`channel()`], bounded
//! in events; the probe sends one batch per drain of its ring buffer, [`PipelineInput`] sends
//! without waiting); [`run`] re-batches them by size and time, applies the current plugin
//! chain to each batch and hands it to the exporter, whose queue drops its oldest requests
//! when full.

pub mod channel;

use std::{sync::Arc, time::Instant};

use tokio_util::sync::CancellationToken;

use crate::{
    export::{ExportHandle, ExportTelemetry},
    probe::event::{ConnectionEvent, EventKind},
};

/// What the plugin chain does to a batch, seen from the pipeline.
///
/// `apply` removes the events the policy drops, leaving the others in their order, and
/// appends the attribute edits it makes to the ones it keeps. It never fails: a failing
/// plugin's `failure_policy` decides inside.
pub trait BatchPolicy: Send + Sync + 'static {
    /// Applies the policy to a batch in place.
    fn apply(&self, batch: &mut Vec<ConnectionEvent>);
}

/// The policy that keeps everything unchanged (no plugins).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeepAll;

impl BatchPolicy for KeepAll {
    fn apply(&self, _batch: &mut Vec<ConnectionEvent>) {}
}

/// The current policy. The plugin host sends a new chain on swap; the pipeline takes the
/// current one per batch, so a batch in flight finishes on the chain it started with.
pub type PolicyRx = tokio::sync::watch::Receiver<Arc<dyn BatchPolicy>>;

/// A policy receiver that always holds [`KeepAll`] (no plugin host).
pub fn keep_all() -> PolicyRx {
    let (tx, rx) = tokio::sync::watch::channel::<Arc<dyn BatchPolicy>>(Arc::new(KeepAll));
    // The value stays readable after the sender is gone.
    drop(tx);
    rx
}

/// The receiving end of the pipeline's input.
pub type PipelineRx = channel::BatchRx<ConnectionEvent>;

/// A sender into the pipeline that counts what it drops (the probe has its own sender and
/// counts its drops as probe losses).
#[derive(Debug, Clone)]
pub struct PipelineInput {
    tx: channel::BatchTx<ConnectionEvent>,
    telemetry: ExportTelemetry,
}

impl PipelineInput {
    /// Hands an event to the pipeline without waiting; see [`PipelineInput::send_batch`].
    pub fn send(&self, event: ConnectionEvent) -> bool {
        self.send_batch(vec![event])
    }

    /// Hands a batch to the pipeline without waiting. When the channel has no room for all
    /// of it (or the pipeline has stopped) the batch is dropped and counted in
    /// `edgeward_pipeline_channel_drops_total`; returns whether it was accepted.
    pub fn send_batch(&self, events: Vec<ConnectionEvent>) -> bool {
        let n = events.len() as u64;
        match self.tx.try_send(events) {
            Ok(()) => true,
            Err(_) => {
                if self.telemetry.channel_drops.inc_by(n) == 0 {
                    tracing::warn!(
                        "pipeline channel full: dropping events (counted in edgeward_pipeline_channel_drops_total)"
                    );
                }
                false
            }
        }
    }

    /// Room in the channel now, in events (a producer that may wait, like a benchmark, can
    /// pace itself with this; the probe never waits).
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }
}

/// The bounded channel into the pipeline, holding at most `capacity` events.
pub fn channel(capacity: usize, telemetry: ExportTelemetry) -> (PipelineInput, PipelineRx) {
    let (tx, rx) = channel::bounded(capacity);
    (PipelineInput { tx, telemetry }, rx)
}

/// Batches events from `rx` by size and time (`otlp.batch_size`, `otlp.batch_timeout`, read
/// per batch so they change live), applies the current policy from `policy` to each batch
/// and hands it to `export`. On `shutdown` it stops intake, drains what the channel already
/// holds, pushes the last batch and cancels `done` so the exporter flushes.
pub async fn run(
    mut rx: PipelineRx,
    policy: PolicyRx,
    export: ExportHandle,
    shutdown: CancellationToken,
    done: CancellationToken,
) {
    let telemetry = export.telemetry().clone();
    let mut batch: Vec<ConnectionEvent> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let config = export.config();
        let sleep_until = deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(3600));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            received = rx.recv() => match received {
                Some(events) => {
                    let was_empty = batch.is_empty();
                    let mut flush_batch = |b: &mut Vec<ConnectionEvent>| {
                        flush(b, &policy, &export, &telemetry)
                    };
                    let size = config.batch_size;
                    let mut flushed = take(&mut batch, events, &rx, size, &mut flush_batch);
                    // Take what is already waiting without going back to the scheduler, up to
                    // one flush (then the loop looks at shutdown again).
                    while !flushed && batch.len() < size {
                        let Some(events) = rx.try_recv() else { break };
                        flushed = take(&mut batch, events, &rx, size, &mut flush_batch);
                    }
                    // A batch times out counting from its first event.
                    deadline = if batch.is_empty() {
                        None
                    } else if was_empty || flushed {
                        Some(tokio::time::Instant::now() + config.batch_timeout)
                    } else {
                        deadline
                    };
                }
                // Every sender is gone: nothing more will come; wait for shutdown.
                None => {
                    flush(&mut batch, &policy, &export, &telemetry);
                    shutdown.cancelled().await;
                    break;
                }
            },
            _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {
                flush(&mut batch, &policy, &export, &telemetry);
                deadline = None;
            }
        }
    }
    // Stop intake, then take what is already in the channel.
    rx.close();
    let size = export.config().batch_size;
    while let Some(events) = rx.try_recv() {
        take(&mut batch, events, &rx, size, |b| {
            flush(b, &policy, &export, &telemetry)
        });
    }
    flush(&mut batch, &policy, &export, &telemetry);
    tracing::debug!("pipeline drained");
    done.cancel();
}

/// Moves `events` into `batch` (kept across flushes, so its room is reused), calling `flush`
/// each time it holds `size` events, and gives the emptied `events` back to the sender.
/// Returns whether it flushed.
fn take(
    batch: &mut Vec<ConnectionEvent>,
    mut events: Vec<ConnectionEvent>,
    rx: &PipelineRx,
    size: usize,
    mut flush: impl FnMut(&mut Vec<ConnectionEvent>),
) -> bool {
    let size = size.max(1);
    // The common case, a batch arriving while none is pending: keep the sender's vector
    // rather than move every event (a few hundred bytes each) into ours.
    if batch.is_empty() && events.len() <= size {
        std::mem::swap(batch, &mut events);
        rx.recycle(events);
        if batch.len() < size {
            return false;
        }
        flush(batch);
        return true;
    }
    let mut flushed = false;
    let mut incoming = events.drain(..);
    loop {
        let room = size.saturating_sub(batch.len());
        batch.extend(incoming.by_ref().take(room));
        if batch.len() < size {
            break;
        }
        flush(batch);
        flushed = true;
    }
    drop(incoming);
    rx.recycle(events);
    flushed
}

fn flush(
    batch: &mut Vec<ConnectionEvent>,
    policy: &PolicyRx,
    export: &ExportHandle,
    telemetry: &ExportTelemetry,
) {
    if batch.is_empty() {
        return;
    }
    let received = batch.len();
    telemetry.events.inc_by(received as u64);
    telemetry.pipeline_batches.inc();
    let current = policy.borrow().clone();
    // Connections whose close the policy drops still end: the connection metrics stop
    // following them (see `ExportHandle::forget`).
    let closes: Vec<u64> = batch
        .iter()
        .filter(|e| e.kind == EventKind::Close)
        .map(|e| e.conn_id)
        .collect();
    let started = Instant::now();
    current.apply(batch);
    let took = started.elapsed();
    telemetry.plugin_latency.observe(took.as_secs_f64());
    telemetry
        .plugin_nanos
        .inc_by(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    telemetry.plugin_calls.inc();
    telemetry
        .plugin_dropped
        .inc_by(received.saturating_sub(batch.len()) as u64);
    if batch.len() < received {
        export.forget(&dropped_closes(&closes, batch));
    }
    export.push_batch(batch);
    batch.clear();
}

/// The connections of `closes` (the close events of a batch, in order) whose close is not in
/// `kept` (what the policy left of that batch, in the same order).
fn dropped_closes(closes: &[u64], kept: &[ConnectionEvent]) -> Vec<u64> {
    let mut kept = kept
        .iter()
        .filter(|e| e.kind == EventKind::Close)
        .map(|e| e.conn_id)
        .peekable();
    closes
        .iter()
        .copied()
        .filter(|id| kept.next_if_eq(id).is_none())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        export::{ExportConfig, Exporter, spans::NodeIdentity, spans::tests_support},
        status::StatusHandle,
    };

    fn event(kind: EventKind, conn_id: u64) -> ConnectionEvent {
        ConnectionEvent {
            kind,
            conn_id,
            ..tests_support::event()
        }
    }

    /// Drops the closes of odd connection ids.
    struct DropOddCloses;

    impl BatchPolicy for DropOddCloses {
        fn apply(&self, batch: &mut Vec<ConnectionEvent>) {
            batch.retain(|e| e.kind != EventKind::Close || e.conn_id % 2 == 0);
        }
    }

    #[test]
    fn dropped_closes_are_the_closes_missing_from_what_was_kept() {
        let kept = [
            event(EventKind::Update, 1),
            event(EventKind::Close, 2),
            event(EventKind::Close, 5),
        ];
        assert_eq!(dropped_closes(&[1, 2, 3, 4, 5], &kept), vec![1, 3, 4]);
        assert!(dropped_closes(&[2, 5], &kept).is_empty());
    }

    #[tokio::test]
    async fn a_close_the_policy_drops_ends_what_the_connection_metrics_follow() {
        let config = ExportConfig {
            endpoint: Some("http://127.0.0.1:9".to_owned()),
            ..ExportConfig::default()
        };
        let (_exporter, export) = Exporter::build(
            &config,
            NodeIdentity::default(),
            StatusHandle::new("n"),
            ExportTelemetry::default(),
            None,
        );
        let (_tx, policy) =
            tokio::sync::watch::channel::<Arc<dyn BatchPolicy>>(Arc::new(DropOddCloses));
        let telemetry = export.telemetry().clone();
        let mut batch: Vec<_> = (1..=4).map(|id| event(EventKind::Update, id)).collect();
        flush(&mut batch, &policy, &export, &telemetry);
        assert_eq!(export.followed(), 4);
        let mut batch: Vec<_> = (1..=4).map(|id| event(EventKind::Close, id)).collect();
        flush(&mut batch, &policy, &export, &telemetry);
        assert_eq!(
            export.followed(),
            0,
            "1 and 3 closed unseen; 2 and 4 by their close"
        );
        assert_eq!(telemetry.plugin_dropped.get(), 2);
    }
}
