//! What the agent is doing, as one value that every component updates and that `/status`,
//! `/readyz` and the node's status key in etcd show.

use std::{
    sync::{Arc, RwLock},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

/// The whole status document. Field names are a contract (see DESIGN.md): tools and tests
/// read them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The node name.
    pub node: String,
    /// The agent's version.
    pub version: String,
    /// When the agent started (RFC 3339, UTC).
    pub started_at: String,
    /// True once desired state has been applied from some source.
    pub ready: bool,
    /// Where the applied configuration came from.
    pub config: ConfigStatus,
    /// Each plugin in the chain.
    pub plugins: Vec<PluginStatus>,
    /// The eBPF probe.
    pub probe: ProbeStatus,
    /// OpenTelemetry export.
    pub export: ExportStatus,
}

/// Where the applied configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigSource {
    /// Live from etcd.
    Etcd,
    /// From the offline cache, etcd being unreachable.
    Cache,
    /// From the standalone directory.
    File,
    /// Built-in defaults: standalone without a directory.
    Default,
}

/// `config` in the status document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// `null` until something has been applied.
    pub source: Option<ConfigSource>,
    /// The etcd revision the applied snapshot stands at (0 for file and default).
    pub revision: i64,
    /// When it was applied (RFC 3339, UTC).
    pub applied_at: Option<String>,
    /// What the agent is waiting for, or why the source is failing, if anything.
    pub last_error: Option<String>,
    /// Keys that were rejected (malformed documents), with why.
    pub rejected: Vec<RejectedKey>,
    /// Why the offline cache could not be used at start, if it could not.
    pub cache_error: Option<String>,
    /// Age of the offline cache the agent started from, in seconds (while `source` is
    /// `cache`).
    pub cache_age_seconds: Option<u64>,
    /// When that cache was written.
    #[serde(skip)]
    pub cache_written_at: Option<SystemTime>,
}

/// A key whose value could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedKey {
    /// The full key.
    pub key: String,
    /// Its mod revision.
    pub revision: i64,
    /// The parse or validation error.
    pub error: String,
}

/// One plugin's entry in `plugins`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginStatus {
    /// The plugin's name.
    pub name: String,
    /// The sha256 of its module.
    pub sha256: String,
    /// Its state.
    pub state: PluginState,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// A plugin's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginState {
    /// In the chain.
    Active,
    /// Failed to load or disabled after repeated failures.
    Failed,
    /// Disabled by its manifest or node selector.
    Disabled,
}

/// `probe` in the status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeStatus {
    /// Its state.
    pub state: ProbeState,
    /// Why it is degraded or off.
    pub reason: Option<String>,
    /// Kernel events seen.
    pub events: u64,
    /// Events lost (ring buffer full, connections forgotten or older than the probe, channel
    /// full, probe runs the kernel skipped).
    pub drops: u64,
    /// `drops` by reason (`ring_buffer_full`, `untracked`, `reader_channel_full`,
    /// `output_channel_full`, `undecodable`, `nested_run_skipped`).
    #[serde(default)]
    pub drop_reasons: std::collections::BTreeMap<String, u64>,
    /// Event fields this kernel cannot give (no BTF, no accept hook); empty when complete.
    #[serde(default)]
    pub missing_fields: Vec<String>,
}

/// The probe's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeState {
    /// Not started yet.
    Starting,
    /// Loaded and attached.
    Running,
    /// Could not load or attach; the rest of the agent runs without it.
    Degraded,
    /// Turned off on purpose (`--no-ebpf`).
    Off,
}

/// `export` in the status document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportStatus {
    /// `running`, `off` or `failing`.
    pub state: String,
    /// Why it is off or failing.
    pub reason: Option<String>,
    /// Batches sent.
    pub batches: u64,
    /// Items dropped.
    pub dropped: u64,
    /// The collector endpoint in use, if any.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `grpc` or `http`.
    #[serde(default)]
    pub protocol: String,
    /// Failed export attempts (each retry counts).
    #[serde(default)]
    pub failures: u64,
    /// Why the last synced export settings were rejected (the last good ones stay in use).
    #[serde(default)]
    pub config_error: Option<String>,
}

/// A shared, cheaply clonable handle on the status document.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    inner: Arc<RwLock<AgentStatus>>,
}

impl StatusHandle {
    /// A fresh status for `node`: nothing applied, probe starting.
    pub fn new(node: &str) -> Self {
        let status = AgentStatus {
            node: node.to_owned(),
            version: crate::VERSION.to_owned(),
            started_at: now_rfc3339(),
            ready: false,
            config: ConfigStatus::default(),
            plugins: Vec::new(),
            probe: ProbeStatus {
                state: ProbeState::Starting,
                reason: None,
                events: 0,
                drops: 0,
                drop_reasons: Default::default(),
                missing_fields: Vec::new(),
            },
            export: ExportStatus {
                state: "off".to_owned(),
                reason: Some("OTLP export is not part of this version yet".to_owned()),
                ..ExportStatus::default()
            },
        };
        Self {
            inner: Arc::new(RwLock::new(status)),
        }
    }

    /// A copy of the current status, with derived fields (the cache's age) filled in.
    pub fn snapshot(&self) -> AgentStatus {
        let mut status = self.read(Clone::clone);
        status.config.cache_age_seconds =
            match (status.config.source, status.config.cache_written_at) {
                (Some(ConfigSource::Cache), Some(at)) => Some(
                    SystemTime::now()
                        .duration_since(at)
                        .unwrap_or_default()
                        .as_secs(),
                ),
                _ => None,
            };
        status
    }

    /// Reads a part of the status under the lock.
    pub fn read<T>(&self, f: impl FnOnce(&AgentStatus) -> T) -> T {
        // A panic while holding the lock cannot leave the status half-written in a way that
        // matters more than losing it; keep serving it.
        let guard = self.inner.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// Changes the status under the lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut AgentStatus) -> T) -> T {
        let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Records that desired state was applied from `source` at `revision`; the agent is ready.
    pub fn config_applied(&self, source: ConfigSource, revision: i64) {
        self.update(|s| {
            s.config.source = Some(source);
            s.config.revision = revision;
            s.config.applied_at = Some(now_rfc3339());
            s.config.last_error = None;
            s.ready = true;
        });
    }
}

/// The current time as RFC 3339 in UTC, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_has_the_contract_fields() {
        let handle = StatusHandle::new("node-1");
        handle.config_applied(ConfigSource::Etcd, 42);
        let json = serde_json::to_value(handle.snapshot()).unwrap();
        assert_eq!(json["config"]["source"], "etcd");
        assert_eq!(json["config"]["revision"], 42);
        assert_eq!(json["probe"]["state"], "starting");
        assert!(json["plugins"].as_array().unwrap().is_empty());
        assert_eq!(json["ready"], true);
    }
}
