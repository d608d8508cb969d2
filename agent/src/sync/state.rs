//! The desired state: what the applied snapshot means for this node, handed to the rest of the
//! agent as one value that is swapped whole (a reader never sees half a change).

use std::{collections::BTreeMap, sync::Arc};

use crate::{plugins::PluginManifest, status::ConfigSource};

/// Everything the agent should be doing, derived from one snapshot of the etcd prefix (or the
/// standalone directory, or the cache).
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredState {
    /// Where the snapshot came from.
    pub source: ConfigSource,
    /// The etcd revision the snapshot stands at (0 for file and default).
    pub revision: i64,
    /// `config/global` merged with `config/nodes/<node>`, field by field (node wins; objects
    /// merge recursively, anything else is replaced). Each component reads its own section,
    /// e.g. `node_config["export"]`, and validates it.
    pub node_config: serde_json::Value,
    /// Labels of this node (`labels` in `node_config`), used by plugin node selectors.
    pub labels: BTreeMap<String, String>,
    /// Plugins to run on this node: valid, enabled, selected, sorted by `order` then name.
    pub plugins: Vec<PluginManifest>,
    /// Module bytes kept in etcd, by sha256, for the plugins above that have them.
    pub modules: BTreeMap<String, Arc<[u8]>>,
}

impl DesiredState {
    /// The state before anything is applied: defaults, no plugins.
    pub fn empty(source: ConfigSource) -> Self {
        Self {
            source,
            revision: 0,
            node_config: serde_json::Value::Object(serde_json::Map::new()),
            labels: BTreeMap::new(),
            plugins: Vec::new(),
            modules: BTreeMap::new(),
        }
    }

    /// The module bytes for a manifest whose module lives in etcd, if the snapshot has all its
    /// chunks (the sha256 is checked by the plugin host, not here).
    pub fn module(&self, sha256: &str) -> Option<Arc<[u8]>> {
        self.modules.get(sha256).cloned()
    }
}

/// How components receive the desired state: the current value, and a notification on change.
pub type DesiredStateRx = tokio::sync::watch::Receiver<Arc<DesiredState>>;
