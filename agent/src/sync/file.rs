//! Standalone mode: desired state from a local directory instead of etcd, laid out like the
//! prefix (`config/global`, `config/nodes/<node>`, `plugins/<name>`, optionally with a `.json`
//! suffix; module chunks at `blobs/sha256/<hex>/0000`), re-read whenever it changes (inotify).
//!
//! Names starting with `.` are skipped, so a Kubernetes ConfigMap mount (whose files are
//! symlinks into a hidden `..data` directory) works as it is.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Applier, Snapshot, snapshot::Entry};
use crate::status::{ConfigSource, StatusHandle};

/// Largest file read from the directory.
const MAX_FILE: u64 = 64 * 1024 * 1024;
/// Changes closer together than this are read as one.
const SETTLE: Duration = Duration::from_millis(100);

/// `[standalone]` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StandaloneConfig {
    /// Directory laid out like the etcd prefix (`config/global`, `config/nodes/<node>`,
    /// `plugins/<name>`). Used only when no etcd endpoint is configured. Without it the agent
    /// runs on built-in defaults.
    pub config_dir: Option<PathBuf>,
}

/// Reads the directory into a snapshot. Keys are `<prefix>/<relative path>`, with a `.json`
/// suffix dropped under `config/` and `plugins/`. A key whose bytes did not change keeps its
/// mod revision from `previous`; changed keys get `previous.revision + 1`.
pub fn read_dir(dir: &Path, prefix: &str, previous: &Snapshot) -> std::io::Result<Snapshot> {
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files)?;
    let revision = previous.revision + 1;
    let mut snapshot = Snapshot {
        revision: previous.revision,
        entries: BTreeMap::new(),
    };
    let mut changed = false;
    for (relative, value) in files {
        let relative = if relative.starts_with("config/") || relative.starts_with("plugins/") {
            relative
                .strip_suffix(".json")
                .unwrap_or(&relative)
                .to_owned()
        } else {
            relative
        };
        let key = format!("{prefix}/{relative}");
        let mod_revision = match previous.entries.get(&key) {
            Some(e) if *e.value == *value => e.mod_revision,
            _ => {
                changed = true;
                revision
            }
        };
        snapshot.entries.insert(
            key,
            Entry {
                value,
                mod_revision,
            },
        );
    }
    if changed || snapshot.entries.len() != previous.entries.len() {
        snapshot.revision = revision;
    }
    Ok(snapshot)
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Arc<[u8]>>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // metadata() follows symlinks (ConfigMap files are links).
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            if meta.len() > MAX_FILE {
                tracing::warn!(path = %path.display(), size = meta.len(), "file too large; skipped");
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.insert(relative, std::fs::read(&path)?.into());
        }
    }
    Ok(())
}

/// Applies the directory, then re-applies it on every change until shutdown.
pub async fn run(
    dir: PathBuf,
    prefix: String,
    mut applier: Applier,
    status: StatusHandle,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = loop {
        match start_watcher(&dir, tx.clone()) {
            Ok(w) => break w,
            Err(e) => {
                let why = format!("standalone.config_dir {}: {e}", dir.display());
                if status.read(|s| s.config.last_error.as_ref() != Some(&why)) {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot watch standalone.config_dir; retrying");
                    status.update(|s| s.config.last_error = Some(why));
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut current = Snapshot::default();
    loop {
        match read_dir(&dir, &prefix, &current) {
            Ok(snapshot) => {
                if snapshot != current || !applier.has_applied() {
                    tracing::info!(dir = %dir.display(), revision = snapshot.revision, keys = snapshot.entries.len(), "standalone directory applied");
                    current = snapshot.clone();
                    applier.reset(snapshot, ConfigSource::File);
                }
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "reading standalone.config_dir failed; keeping the last state");
                status.update(|s| {
                    s.config.last_error =
                        Some(format!("standalone.config_dir {}: {e}", dir.display()));
                });
                // The directory may have been replaced: watch it again.
                if let Ok(w) = start_watcher(&dir, tx.clone()) {
                    watcher = w;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = rx.recv() => {}
        }
        // Let a burst of writes (an editor, a ConfigMap swap) settle.
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
    }
    drop(watcher);
}

fn start_watcher(
    dir: &Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    if !dir.is_dir() {
        return Err(notify::Error::path_not_found().add_path(dir.to_owned()));
    }
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // Full means a re-read is already due.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::Recursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_maps_to_keys_and_revisions_move_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config/nodes")).unwrap();
        std::fs::create_dir_all(dir.path().join("..data")).unwrap();
        std::fs::write(dir.path().join("config/global.json"), "{}").unwrap();
        std::fs::write(dir.path().join("config/nodes/n1"), "{\"a\":1}").unwrap();
        std::fs::write(dir.path().join("..data/ignored"), "x").unwrap();
        let first = read_dir(dir.path(), "/p", &Snapshot::default()).unwrap();
        let keys: Vec<&str> = first.entries.keys().map(String::as_str).collect();
        assert_eq!(keys, ["/p/config/global", "/p/config/nodes/n1"]);
        assert_eq!(first.revision, 1);

        let same = read_dir(dir.path(), "/p", &first).unwrap();
        assert_eq!(same, first);

        std::fs::write(dir.path().join("config/nodes/n1"), "{\"a\":2}").unwrap();
        let second = read_dir(dir.path(), "/p", &first).unwrap();
        assert_eq!(second.revision, 2);
        assert_eq!(second.entries["/p/config/global"].mod_revision, 1);
        assert_eq!(second.entries["/p/config/nodes/n1"].mod_revision, 2);
    }
}
