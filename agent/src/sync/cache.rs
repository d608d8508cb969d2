//! The offline cache: the last applied snapshot on local disk, so the agent starts and keeps
//! working while etcd is unreachable.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[cache]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Directory of the cache. Created if missing; should be on persistent storage (a hostPath
    /// in Kubernetes).
    pub dir: PathBuf,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/edgeward"),
        }
    }
}
