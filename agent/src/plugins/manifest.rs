//! The plugin manifest: what `<prefix>/plugins/<name>` holds in etcd (or `plugins/<name>` in
//! the standalone directory), as JSON.
//!
//! ```json
//! {
//!   "name": "deny-ssh",
//!   "version": "1.2.0",
//!   "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
//!   "module": { "etcd": { "size": 48213, "chunks": 1 } },
//!   "config": { "ports": [22] },
//!   "order": 10,
//!   "failure_policy": "fail_open",
//!   "limits": { "batch_timeout": "5ms", "memory_mib": 16 },
//!   "node_selector": { "names": ["edge-*"], "labels": { "region": "eu" } },
//!   "enabled": true,
//!   "capabilities": []
//! }
//! ```
//!
//! A module kept in etcd lives in chunks at `<prefix>/blobs/sha256/<hex>/<index>` (index as
//! four decimal digits from `0000`), each at most [`BLOB_CHUNK_SIZE`] bytes, because an etcd
//! request is limited to about 1.5 MiB.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::serde_duration;

/// Largest chunk of a module stored in etcd.
pub const BLOB_CHUNK_SIZE: usize = 1024 * 1024;

/// A plugin manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginManifest {
    /// The plugin's name; equal to the last segment of its key.
    pub name: String,
    /// The plugin's own version (informational).
    #[serde(default)]
    pub version: String,
    /// Lowercase hex sha256 of the module bytes.
    pub sha256: String,
    /// Where the module bytes are.
    pub module: ModuleLocation,
    /// The plugin's configuration, handed to its `init` as JSON text.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Position in the chain: lower runs first; ties broken by name.
    #[serde(default)]
    pub order: i32,
    /// What an error of this plugin does to the batch.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Sandbox limits.
    #[serde(default)]
    pub limits: PluginLimits,
    /// Which nodes run it. Empty: every node.
    #[serde(default)]
    pub node_selector: NodeSelector,
    /// False keeps the manifest but runs nothing.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Host capabilities beyond the default few (log, counter, clock), granted only if the
    /// agent's configuration allows them too.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
}

fn yes() -> bool {
    true
}

/// Where a module's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ModuleLocation {
    /// Chunks under `<prefix>/blobs/sha256/<sha256>/`.
    Etcd {
        /// Total size in bytes.
        size: u64,
        /// Number of chunks.
        chunks: u32,
    },
    /// An https URL.
    Url(String),
}

/// What an error (trap, timeout, bad verdicts) of a plugin does to the batch it was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Keep the events unchanged, as if the plugin were not there.
    #[default]
    FailOpen,
    /// Drop the events (for plugins that redact: better nothing than unredacted data).
    FailClosed,
}

/// Limits of one plugin instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimits {
    /// Time one batch call may take; capped by the agent's configuration.
    #[serde(with = "serde_duration")]
    pub batch_timeout: Duration,
    /// Linear memory the instance may grow to, MiB.
    pub memory_mib: u32,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            batch_timeout: Duration::from_millis(10),
            memory_mib: 16,
        }
    }
}

/// Which nodes a plugin runs on: all conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSelector {
    /// Node-name patterns (`*` matches any run of characters); empty matches every node.
    pub names: Vec<String>,
    /// Labels the node must carry (from `labels` in its merged config document).
    pub labels: BTreeMap<String, String>,
}

/// A host capability a plugin may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// WASI random numbers.
    Random,
    /// WASI environment variables (empty unless the operator passes some).
    Environment,
}

/// Why a manifest is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON, or not of this shape.
    #[error("manifest is not valid: {0}")]
    Parse(String),
    /// A field has an unusable value.
    #[error("manifest field `{field}` = {value:?}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: &'static str,
    },
}

impl PluginManifest {
    /// Parses and validates a manifest stored under the plugin name `key_name`.
    pub fn parse(key_name: &str, bytes: &[u8]) -> Result<Self, ManifestError> {
        let manifest: PluginManifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        manifest.validate(key_name)?;
        Ok(manifest)
    }

    fn validate(&self, key_name: &str) -> Result<(), ManifestError> {
        let invalid = |field, value: &str, reason| ManifestError::Invalid {
            field,
            value: value.to_owned(),
            reason,
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !name_ok {
            return Err(invalid(
                "name",
                &self.name,
                "1 to 63 characters of a-z, 0-9, '-' and '_'",
            ));
        }
        if self.name != key_name {
            return Err(invalid(
                "name",
                &self.name,
                "must equal the last segment of its key",
            ));
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(invalid("sha256", &self.sha256, "64 lowercase hex digits"));
        }
        match &self.module {
            ModuleLocation::Etcd { size, chunks } => {
                let needed = size.div_ceil(BLOB_CHUNK_SIZE as u64).max(1);
                if *size == 0 || u64::from(*chunks) != needed {
                    return Err(invalid(
                        "module.etcd.chunks",
                        &chunks.to_string(),
                        "must be size / 1 MiB, rounded up, and size must not be 0",
                    ));
                }
            }
            ModuleLocation::Url(url) => {
                if !url.starts_with("https://") {
                    return Err(invalid("module.url", url, "must be an https:// URL"));
                }
            }
        }
        if self.limits.batch_timeout.is_zero() {
            return Err(invalid(
                "limits.batch_timeout",
                "0s",
                "must be longer than zero",
            ));
        }
        if self.limits.memory_mib == 0 || self.limits.memory_mib > 4096 {
            return Err(invalid(
                "limits.memory_mib",
                &self.limits.memory_mib.to_string(),
                "must be from 1 to 4096",
            ));
        }
        Ok(())
    }

    /// The etcd key of chunk `index` of this manifest's module under `prefix`.
    pub fn blob_chunk_key(prefix: &str, sha256: &str, index: u32) -> String {
        format!("{prefix}/blobs/sha256/{sha256}/{index:04}")
    }
}

impl NodeSelector {
    /// Whether a node with this name and these labels is selected.
    pub fn matches(&self, node: &str, labels: &BTreeMap<String, String>) -> bool {
        let name_ok = self.names.is_empty() || self.names.iter().any(|p| glob_match(p, node));
        name_ok
            && self
                .labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn manifest(extra: &str) -> String {
        format!(
            r#"{{"name":"deny-ssh","sha256":"{SHA}","module":{{"etcd":{{"size":10,"chunks":1}}}}{extra}}}"#
        )
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = PluginManifest::parse("deny-ssh", manifest("").as_bytes()).unwrap();
        assert!(m.enabled);
        assert_eq!(m.failure_policy, FailurePolicy::FailOpen);
        assert_eq!(m.limits, PluginLimits::default());
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let e = PluginManifest::parse("other", manifest("").as_bytes()).unwrap_err();
        assert!(e.to_string().contains("`name`"), "{e}");
        let e = PluginManifest::parse(
            "deny-ssh",
            manifest(r#","failure_policy":"maybe""#).as_bytes(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
        let e = PluginManifest::parse(
            "deny-ssh",
            manifest(r#","limits":{"memory_mib":0}"#).as_bytes(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("limits.memory_mib"), "{e}");
        let e = PluginManifest::parse("deny-ssh", br#"{"name": 1}"#).unwrap_err();
        assert!(matches!(e, ManifestError::Parse(_)), "{e}");
    }

    #[test]
    fn selector_globs_and_labels() {
        let sel = NodeSelector {
            names: vec!["edge-*".into()],
            labels: BTreeMap::from([("region".into(), "eu".into())]),
        };
        let eu = BTreeMap::from([("region".to_owned(), "eu".to_owned())]);
        assert!(sel.matches("edge-17", &eu));
        assert!(!sel.matches("core-1", &eu));
        assert!(!sel.matches("edge-17", &BTreeMap::new()));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxc"));
        assert!(glob_match("*", ""));
    }
}
