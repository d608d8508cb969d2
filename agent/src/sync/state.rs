//! The desired state: what the applied snapshot means for this node, handed to the rest of the
//! agent as one value that is swapped whole (a reader never sees half a change).

use std::{collections::BTreeMap, sync::Arc};

use super::snapshot::Snapshot;
use crate::{
    plugins::{ModuleLocation, PluginManifest},
    status::{ConfigSource, RejectedKey},
};

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

/// Turns snapshots into [`DesiredState`]s for one node, remembering the last good value of each
/// document so that a malformed write never takes away what was working.
#[derive(Debug)]
pub struct Deriver {
    prefix: String,
    node: String,
    /// Parse results by key, valid for one mod revision.
    parsed: BTreeMap<String, Parsed>,
    /// The last value of each key that parsed and validated.
    last_good: BTreeMap<String, Doc>,
    /// Assembled modules by sha256, with the mod revisions of the chunks they came from.
    modules: BTreeMap<String, (Vec<i64>, Arc<[u8]>)>,
}

#[derive(Debug)]
struct Parsed {
    mod_revision: i64,
    error: Option<String>,
}

#[derive(Debug, Clone)]
enum Doc {
    Config(serde_json::Value),
    Plugin(Box<PluginManifest>),
}

/// The result of [`Deriver::derive`].
#[derive(Debug, Clone)]
pub struct Derived {
    /// The state to apply.
    pub state: DesiredState,
    /// Keys whose current value was rejected (the last good value, if any, is used instead).
    pub rejected: Vec<RejectedKey>,
}

impl Deriver {
    /// A deriver for `node` under `prefix` (no trailing slash).
    pub fn new(prefix: &str, node: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            parsed: BTreeMap::new(),
            last_good: BTreeMap::new(),
            modules: BTreeMap::new(),
        }
    }

    /// The desired state a snapshot means for this node.
    pub fn derive(&mut self, snapshot: &Snapshot, source: ConfigSource) -> Derived {
        let global_key = format!("{}/config/global", self.prefix);
        let node_key = format!("{}/config/nodes/{}", self.prefix, self.node);
        let plugins_prefix = format!("{}/plugins/", self.prefix);

        // Forget keys that are gone.
        self.parsed.retain(|k, _| snapshot.entries.contains_key(k));
        self.last_good
            .retain(|k, _| snapshot.entries.contains_key(k));

        let mut rejected = Vec::new();
        for (key, entry) in &snapshot.entries {
            let plugin_name = key.strip_prefix(&plugins_prefix);
            if *key != global_key && *key != node_key && plugin_name.is_none() {
                continue;
            }
            let fresh = self
                .parsed
                .get(key)
                .is_none_or(|p| p.mod_revision != entry.mod_revision);
            if fresh {
                let result = match plugin_name {
                    Some(name) => PluginManifest::parse(name, &entry.value)
                        .map(|m| Doc::Plugin(Box::new(m)))
                        .map_err(|e| e.to_string()),
                    None => parse_config_doc(&entry.value).map(Doc::Config),
                };
                let error = match result {
                    Ok(doc) => {
                        self.last_good.insert(key.clone(), doc);
                        None
                    }
                    Err(error) => {
                        tracing::warn!(
                            key = %key,
                            revision = entry.mod_revision,
                            error = %error,
                            kept = if self.last_good.contains_key(key) { "last good value" } else { "nothing" },
                            "document rejected"
                        );
                        Some(error)
                    }
                };
                self.parsed.insert(
                    key.clone(),
                    Parsed {
                        mod_revision: entry.mod_revision,
                        error,
                    },
                );
            }
            if let Some(error) = self.parsed.get(key).and_then(|p| p.error.clone()) {
                rejected.push(RejectedKey {
                    key: key.clone(),
                    revision: entry.mod_revision,
                    error,
                });
            }
        }

        let mut node_config = serde_json::Value::Object(serde_json::Map::new());
        for key in [&global_key, &node_key] {
            if let Some(Doc::Config(doc)) = self.last_good.get(key) {
                merge(&mut node_config, doc);
            }
        }
        let labels: BTreeMap<String, String> = node_config
            .get("labels")
            .and_then(|l| l.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                    .collect()
            })
            .unwrap_or_default();

        let mut plugins: Vec<PluginManifest> = self
            .last_good
            .iter()
            .filter(|(k, _)| k.starts_with(&plugins_prefix))
            .filter_map(|(_, doc)| match doc {
                Doc::Plugin(m) => Some((**m).clone()),
                Doc::Config(_) => None,
            })
            .filter(|m| m.enabled && m.node_selector.matches(&self.node, &labels))
            .collect();
        plugins.sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.name.cmp(&b.name)));

        let mut modules = BTreeMap::new();
        let mut used = BTreeMap::new();
        for plugin in &plugins {
            if let ModuleLocation::Etcd { size, chunks } = plugin.module
                && let Some(bytes) =
                    self.assemble(snapshot, &plugin.sha256, size, chunks, &mut used)
            {
                modules.insert(plugin.sha256.clone(), bytes);
            }
        }
        self.modules = used;

        Derived {
            state: DesiredState {
                source,
                revision: snapshot.revision,
                node_config,
                labels,
                plugins,
                modules,
            },
            rejected,
        }
    }

    /// Concatenates a module's chunks if all are present and the size matches; reuses the
    /// previous assembly when no chunk changed.
    fn assemble(
        &self,
        snapshot: &Snapshot,
        sha256: &str,
        size: u64,
        chunks: u32,
        used: &mut BTreeMap<String, (Vec<i64>, Arc<[u8]>)>,
    ) -> Option<Arc<[u8]>> {
        let mut revisions = Vec::with_capacity(chunks as usize);
        let mut parts = Vec::with_capacity(chunks as usize);
        for index in 0..chunks {
            let key = PluginManifest::blob_chunk_key(&self.prefix, sha256, index);
            let entry = snapshot.entries.get(&key)?;
            revisions.push(entry.mod_revision);
            parts.push(entry.value.clone());
        }
        if let Some((revs, bytes)) = self.modules.get(sha256)
            && *revs == revisions
        {
            used.insert(sha256.to_owned(), (revisions, bytes.clone()));
            return Some(bytes.clone());
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total as u64 != size {
            tracing::warn!(
                sha256,
                expected = size,
                found = total,
                "module chunks do not add up to the manifest's size"
            );
            return None;
        }
        let mut bytes = Vec::with_capacity(total);
        for part in parts {
            bytes.extend_from_slice(&part);
        }
        let bytes: Arc<[u8]> = bytes.into();
        used.insert(sha256.to_owned(), (revisions, bytes.clone()));
        Some(bytes)
    }
}

/// A config document must be a JSON object.
fn parse_config_doc(bytes: &[u8]) -> Result<serde_json::Value, String> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(other) => Err(format!(
            "a config document must be a JSON object, not {}",
            match other {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            }
        )),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

/// Merges `overlay` into `base` field by field: objects merge recursively, anything else
/// (including arrays) replaces.
pub fn merge(base: &mut serde_json::Value, overlay: &serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overlay)) => {
            for (k, v) in overlay {
                match base.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        base.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::sync::snapshot::Change;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn snapshot(entries: &[(&str, &[u8], i64)]) -> Snapshot {
        let mut s = Snapshot::default();
        let changes: Vec<Change> = entries
            .iter()
            .map(|(k, v, r)| Change::Put {
                key: format!("/p/{k}"),
                value: (*v).into(),
                mod_revision: *r,
            })
            .collect();
        let rev = entries.iter().map(|e| e.2).max().unwrap_or(0);
        s.apply(&changes, rev);
        s
    }

    fn manifest(name: &str, order: i32, extra: &str) -> Vec<u8> {
        format!(
            r#"{{"name":"{name}","sha256":"{SHA}","order":{order},"module":{{"etcd":{{"size":6,"chunks":1}}}}{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn node_overrides_global_field_by_field() {
        let s = snapshot(&[
            (
                "config/global",
                br#"{"a": 1, "export": {"x": 1, "y": 2}, "list": [1]}"#,
                2,
            ),
            (
                "config/nodes/n1",
                br#"{"export": {"y": 3}, "list": [2]}"#,
                3,
            ),
            ("config/nodes/n2", br#"{"a": 99}"#, 4),
        ]);
        let d = Deriver::new("/p", "n1").derive(&s, ConfigSource::Etcd);
        assert_eq!(
            d.state.node_config,
            json!({"a": 1, "export": {"x": 1, "y": 3}, "list": [2]})
        );
        assert_eq!(d.state.revision, 4);
        assert!(d.rejected.is_empty());
    }

    #[test]
    fn malformed_document_keeps_last_good_and_is_reported() {
        let mut deriver = Deriver::new("/p", "n1");
        let good = snapshot(&[("config/global", br#"{"a": 1}"#, 2)]);
        deriver.derive(&good, ConfigSource::Etcd);
        let bad = snapshot(&[
            ("config/global", b"{not json", 3),
            ("config/nodes/n1", br#"{"b": 2}"#, 4),
        ]);
        let d = deriver.derive(&bad, ConfigSource::Etcd);
        assert_eq!(d.state.node_config, json!({"a": 1, "b": 2}));
        assert_eq!(d.rejected.len(), 1);
        assert_eq!(d.rejected[0].key, "/p/config/global");
        assert_eq!(d.rejected[0].revision, 3);
        assert!(
            d.rejected[0].error.contains("invalid JSON"),
            "{:?}",
            d.rejected
        );
    }

    #[test]
    fn plugins_are_selected_sorted_and_assembled() {
        let s = snapshot(&[
            ("config/nodes/n1", br#"{"labels": {"region": "eu"}}"#, 2),
            ("plugins/b", &manifest("b", 1, ""), 3),
            ("plugins/a", &manifest("a", 1, ""), 4),
            ("plugins/first", &manifest("first", 0, ""), 5),
            ("plugins/off", &manifest("off", 0, r#","enabled":false"#), 6),
            (
                "plugins/us",
                &manifest("us", 0, r#","node_selector":{"labels":{"region":"us"}}"#),
                7,
            ),
            ("plugins/bad", b"[]", 8),
            (&format!("blobs/sha256/{SHA}/0000"), b"module", 9),
        ]);
        let d = Deriver::new("/p", "n1").derive(&s, ConfigSource::Etcd);
        let names: Vec<&str> = d.state.plugins.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["first", "a", "b"]);
        assert_eq!(d.state.module(SHA).as_deref(), Some(&b"module"[..]));
        assert_eq!(d.rejected.len(), 1, "{:?}", d.rejected);
        assert_eq!(d.rejected[0].key, "/p/plugins/bad");
    }
}
