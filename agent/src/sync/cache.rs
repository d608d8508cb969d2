//! The offline cache: the last applied snapshot on local disk, so the agent starts and keeps
//! working while etcd is unreachable.
//!
//! One file, `snapshot.bin`, replaced atomically (write a temporary file, fsync, rename,
//! fsync the directory), so a crash at any point leaves the old file or the new one. Its
//! layout (all integers little-endian):
//!
//! ```text
//! "EDGEWARD-CACHE/1\n"                 17-byte magic, the version in it
//! u32                                  length of the header
//! header                               JSON: prefix, revision, written_at_unix, entries
//!                                      [{key, mod_revision, len}] in order
//! values                               the entries' values, concatenated in order
//! [u8; 32]                             sha256 of everything before it
//! ```
//!
//! A file that fails any check is moved aside (`snapshot.bin.corrupt-<unix time>`) with an
//! error, never half-trusted.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::snapshot::{Entry, Snapshot};

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

const MAGIC: &[u8] = b"EDGEWARD-CACHE/1\n";
const FILE_NAME: &str = "snapshot.bin";
const DIGEST_LEN: usize = 32;

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// An I/O error on a cache path.
    #[error("cache {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file exists but fails its checks.
    #[error("cache {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Which check failed.
        reason: String,
    },
    /// The file is for another etcd prefix.
    #[error("cache {path} holds prefix {found}, not {expected}")]
    OtherPrefix {
        /// The file.
        path: PathBuf,
        /// The prefix configured now.
        expected: String,
        /// The prefix in the file.
        found: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    prefix: String,
    revision: i64,
    written_at_unix: u64,
    entries: Vec<HeaderEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct HeaderEntry {
    key: String,
    mod_revision: i64,
    len: u64,
}

/// A snapshot read back from the cache.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The etcd prefix it was written for.
    pub prefix: String,
    /// The snapshot.
    pub snapshot: Snapshot,
    /// When it was written.
    pub written_at: SystemTime,
}

impl Cached {
    /// How old the cache is.
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.written_at)
            .unwrap_or_default()
    }
}

/// The cache file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Serializes a snapshot in the cache format into `out`, hashing as it goes, so that a large
/// snapshot is never copied whole in memory.
fn encode_to(
    out: &mut impl std::io::Write,
    prefix: &str,
    snapshot: &Snapshot,
    written_at: SystemTime,
) -> std::io::Result<()> {
    let header = Header {
        prefix: prefix.to_owned(),
        revision: snapshot.revision,
        written_at_unix: written_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        entries: snapshot
            .entries
            .iter()
            .map(|(key, e)| HeaderEntry {
                key: key.clone(),
                mod_revision: e.mod_revision,
                len: e.value.len() as u64,
            })
            .collect(),
    };
    let header = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    let mut hasher = Sha256::new();
    let header_len = u32::try_from(header.len())
        .map_err(|_| std::io::Error::other("cache header larger than 4 GiB"))?
        .to_le_bytes();
    for part in [MAGIC, &header_len[..], &header] {
        hasher.update(part);
        out.write_all(part)?;
    }
    for e in snapshot.entries.values() {
        hasher.update(&e.value);
        out.write_all(&e.value)?;
    }
    out.write_all(&hasher.finalize())
}

#[cfg(test)]
fn encode(prefix: &str, snapshot: &Snapshot, written_at: SystemTime) -> Vec<u8> {
    let mut out = Vec::new();
    encode_to(&mut out, prefix, snapshot, written_at).expect("writing to a Vec");
    out
}

/// Parses the cache format; the error says which check failed.
fn decode(bytes: &[u8]) -> Result<(String, Snapshot, SystemTime), String> {
    if bytes.len() < MAGIC.len() + 4 + DIGEST_LEN {
        return Err(format!("truncated: {} bytes", bytes.len()));
    }
    if !bytes.starts_with(MAGIC) {
        return Err("not an edgeward cache file of format 1 (bad magic)".to_owned());
    }
    let (body, digest) = bytes.split_at(bytes.len() - DIGEST_LEN);
    if Sha256::digest(body).as_slice() != digest {
        return Err("checksum mismatch".to_owned());
    }
    let rest = &body[MAGIC.len()..];
    let header_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let rest = &rest[4..];
    if header_len > rest.len() {
        return Err(format!("header length {header_len} past the end"));
    }
    let (header, mut values) = rest.split_at(header_len);
    let header: Header =
        serde_json::from_slice(header).map_err(|e| format!("header is not valid: {e}"))?;
    let mut snapshot = Snapshot {
        revision: header.revision,
        ..Snapshot::default()
    };
    for e in header.entries {
        let len = usize::try_from(e.len).map_err(|_| format!("entry {} too large", e.key))?;
        if len > values.len() {
            return Err(format!("entry {} runs past the end", e.key));
        }
        let (value, tail) = values.split_at(len);
        values = tail;
        snapshot.entries.insert(
            e.key,
            Entry {
                value: Arc::from(value),
                mod_revision: e.mod_revision,
            },
        );
    }
    if !values.is_empty() {
        return Err(format!(
            "{} unaccounted bytes after the entries",
            values.len()
        ));
    }
    let written_at = UNIX_EPOCH + Duration::from_secs(header.written_at_unix);
    Ok((header.prefix, snapshot, written_at))
}

/// Reads the cache in `dir` without judging its prefix. `Ok(None)` when there is none.
pub fn read(dir: &Path) -> Result<Option<Cached>, CacheError> {
    let path = path(dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CacheError::Io { path, source }),
    };
    let (prefix, snapshot, written_at) = decode(&bytes).map_err(|reason| CacheError::Corrupt {
        path: path.clone(),
        reason,
    })?;
    Ok(Some(Cached {
        prefix,
        snapshot,
        written_at,
    }))
}

/// Loads the cache for `prefix`. A corrupt file is moved aside (so the next good snapshot can
/// be written) and reported as an error.
pub fn load(dir: &Path, prefix: &str) -> Result<Option<Cached>, CacheError> {
    match read(dir) {
        Ok(Some(cached)) if cached.prefix != prefix => Err(CacheError::OtherPrefix {
            path: path(dir),
            expected: prefix.to_owned(),
            found: cached.prefix,
        }),
        Err(e @ CacheError::Corrupt { .. }) => {
            let from = path(dir);
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = dir.join(format!("{FILE_NAME}.corrupt-{stamp}"));
            if let Err(rename) = fs::rename(&from, &aside) {
                tracing::error!(path = %from.display(), error = %rename, "cannot move the corrupt cache aside");
            } else {
                tracing::error!(path = %aside.display(), "corrupt cache moved aside");
            }
            Err(e)
        }
        other => other,
    }
}

/// Writes `snapshot` atomically: the file is either the old one or the new one, whatever
/// happens.
pub fn write(dir: &Path, prefix: &str, snapshot: &Snapshot) -> Result<(), CacheError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CacheError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".{FILE_NAME}.tmp-{}", std::process::id()));
    let file = fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    encode_to(&mut out, prefix, snapshot, SystemTime::now()).map_err(io(&tmp))?;
    let file = out.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    let target = path(dir);
    fs::rename(&tmp, &target).map_err(io(&target))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// Removes temporary files left by a writer that was killed mid-write.
fn remove_stale_temp(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!(".{FILE_NAME}.tmp-"))
        {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed an interrupted cache write")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an interrupted cache write")
                }
            }
        }
    }
}

/// Writes snapshots as they are applied, latest first, never replacing a newer revision with
/// an older one. Runs until the sender side is dropped, then writes the last one.
pub async fn run_writer(
    dir: PathBuf,
    prefix: String,
    mut rx: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
    mut on_disk: i64,
    metrics: super::SyncMetrics,
) {
    remove_stale_temp(&dir);
    loop {
        let changed = rx.changed().await.is_ok();
        let latest = rx.borrow_and_update().clone();
        if let Some(snapshot) = latest {
            if snapshot.revision < on_disk {
                tracing::warn!(
                    cached = on_disk,
                    offered = snapshot.revision,
                    "not replacing the cache with an older revision"
                );
            } else if snapshot.revision > on_disk || on_disk == 0 {
                let (dir, prefix) = (dir.clone(), prefix.clone());
                let revision = snapshot.revision;
                let result =
                    tokio::task::spawn_blocking(move || write(&dir, &prefix, &snapshot)).await;
                match result {
                    Ok(Ok(())) => {
                        on_disk = revision;
                        metrics.cache_writes.inc();
                    }
                    Ok(Err(e)) => {
                        metrics.cache_write_errors.inc();
                        tracing::error!(error = %e, revision, "cache write failed");
                    }
                    Err(e) => tracing::error!(error = %e, "cache writer panicked"),
                }
            }
        }
        if !changed {
            return;
        }
    }
}

/// What `edgeward cache inspect` prints.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The file.
    pub path: PathBuf,
    /// `ok`, or why it failed.
    pub checksum: String,
    /// The prefix it was written for.
    pub prefix: Option<String>,
    /// The revision it stands at.
    pub revision: Option<i64>,
    /// When it was written (RFC 3339).
    pub written_at: Option<String>,
    /// Its age in seconds.
    pub age_seconds: Option<u64>,
    /// Every key.
    pub keys: Vec<InspectedKey>,
    /// sha256 of the plugin modules whose chunks it holds.
    pub modules: Vec<String>,
}

/// One key in [`Inspection`].
#[derive(Debug, Serialize)]
pub struct InspectedKey {
    /// The key.
    pub key: String,
    /// Its mod revision.
    pub mod_revision: i64,
    /// Its value's size in bytes.
    pub size: usize,
}

/// Reads the cache in `dir` for display; never moves anything.
pub fn inspect(dir: &Path) -> Result<Inspection, CacheError> {
    let path = path(dir);
    let mut out = Inspection {
        path: path.clone(),
        checksum: "ok".to_owned(),
        prefix: None,
        revision: None,
        written_at: None,
        age_seconds: None,
        keys: Vec::new(),
        modules: Vec::new(),
    };
    match read(dir) {
        Ok(None) => Err(CacheError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no cache file"),
        }),
        Ok(Some(cached)) => {
            out.revision = Some(cached.snapshot.revision);
            out.written_at = Some(humantime::format_rfc3339_seconds(cached.written_at).to_string());
            out.age_seconds = Some(cached.age().as_secs());
            for (key, e) in &cached.snapshot.entries {
                if let Some(sha) = key
                    .strip_prefix(&format!("{}/blobs/sha256/", cached.prefix))
                    .and_then(|rest| rest.split('/').next())
                    && !out.modules.iter().any(|m| m == sha)
                {
                    out.modules.push(sha.to_owned());
                }
                out.keys.push(InspectedKey {
                    key: key.clone(),
                    mod_revision: e.mod_revision,
                    size: e.value.len(),
                });
            }
            out.prefix = Some(cached.prefix);
            Ok(out)
        }
        Err(CacheError::Corrupt { reason, .. }) => {
            out.checksum = reason;
            Ok(out)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::snapshot::Change;

    fn sample() -> Snapshot {
        let mut s = Snapshot::default();
        s.apply(
            &[
                Change::Put {
                    key: "/p/config/global".into(),
                    value: b"{}".as_slice().into(),
                    mod_revision: 5,
                },
                Change::Put {
                    key: "/p/blobs/sha256/ab/0000".into(),
                    value: vec![0u8; 3000].into(),
                    mod_revision: 6,
                },
            ],
            9,
        );
        s
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "/p", &sample()).unwrap();
        let cached = load(dir.path(), "/p").unwrap().unwrap();
        assert_eq!(cached.snapshot, sample());
        assert!(cached.age() < Duration::from_secs(5));
        let inspection = inspect(dir.path()).unwrap();
        assert_eq!(inspection.revision, Some(9));
        assert_eq!(inspection.modules, ["ab"]);
    }

    #[test]
    fn every_corruption_is_caught_and_moved_aside() {
        let good = encode("/p", &sample(), SystemTime::now());
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() / 2].to_vec()),
            ("empty", Vec::new()),
            ("no checksum", good[..good.len() - DIGEST_LEN].to_vec()),
        ];
        for i in [0, 20, good.len() / 2, good.len() - 1] {
            let mut flipped = good.clone();
            flipped[i] ^= 0x40;
            cases.push(("flipped byte", flipped));
        }
        for (what, bytes) in cases {
            let dir = tempfile::tempdir().unwrap();
            fs::write(path(dir.path()), &bytes).unwrap();
            let err = load(dir.path(), "/p").unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }), "{what}: {err}");
            assert!(
                !path(dir.path()).exists(),
                "{what}: corrupt file moved aside"
            );
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "{what}");
        }
    }

    #[test]
    fn other_prefix_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "/a", &sample()).unwrap();
        assert!(matches!(
            load(dir.path(), "/b"),
            Err(CacheError::OtherPrefix { .. })
        ));
    }
}
