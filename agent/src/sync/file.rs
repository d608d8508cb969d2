//! Standalone mode: desired state from a local directory instead of etcd.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[standalone]` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StandaloneConfig {
    /// Directory laid out like the etcd prefix (`config/global`, `config/nodes/<node>`,
    /// `plugins/<name>`). Used only when no etcd endpoint is configured. Without it the agent
    /// runs on built-in defaults.
    pub config_dir: Option<PathBuf>,
}

/// Applies the standalone directory. Watching it for changes arrives with the full sync.
pub async fn run(
    dir: PathBuf,
    status: crate::status::StatusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) {
    match tokio::fs::metadata(&dir).await {
        Ok(meta) if meta.is_dir() => {
            tracing::info!(dir = %dir.display(), "standalone configuration applied");
            status.config_applied(crate::status::ConfigSource::File, 0);
        }
        Ok(_) => {
            let why = format!("standalone.config_dir {} is not a directory", dir.display());
            tracing::error!(dir = %dir.display(), "standalone.config_dir is not a directory");
            status.update(|s| s.config.last_error = Some(why));
        }
        Err(e) => {
            let why = format!("standalone.config_dir {}: {e}", dir.display());
            tracing::error!(dir = %dir.display(), error = %e, "standalone.config_dir unreadable");
            status.update(|s| s.config.last_error = Some(why));
        }
    }
    shutdown.cancelled().await;
}
