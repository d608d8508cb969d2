//! Enrichment: executable name of the process, container id and Kubernetes pod UID from the
//! task's cgroup path. Both caches are bounded; the cgroup path comes from cgroupfs (the
//! cgroup v2 id is the inode number of the cgroup's directory), never from a shell-out.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use super::event::ConnectionEvent;

/// A map that holds at most `capacity` entries and forgets the oldest inserted first.
#[derive(Debug)]
pub struct BoundedCache<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V> BoundedCache<K, V> {
    /// An empty cache of at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// The value for `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// Inserts, evicting the oldest entry when full.
    pub fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What a cgroup path says about the workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Container id (64 hex digits).
    pub container_id: Option<Arc<str>>,
    /// Kubernetes pod UID.
    pub pod_uid: Option<Arc<str>>,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Parses a cgroup path as written by container runtimes and the kubelet, with the systemd
/// driver (`kubepods-besteffort-pod<uid_with_underscores>.slice`,
/// `cri-containerd-<id>.scope`, `docker-<id>.scope`, `crio-<id>.scope`) or the cgroupfs driver
/// (`/kubepods/besteffort/pod<uid>/<id>`, `/docker/<id>`).
pub fn parse_cgroup_path(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo::default();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let stem = part
            .strip_suffix(".scope")
            .or_else(|| part.strip_suffix(".slice"))
            .unwrap_or(part);
        // Container: the last dash-separated word of a scope, or a bare id.
        let candidate = stem.rsplit(['-', ':']).next().unwrap_or(stem);
        if is_hex64(candidate) {
            info.container_id = Some(Arc::from(candidate));
        }
        // Pod: "pod<uid>" as the last dash-separated word of a slice, or a bare directory.
        if let Some(idx) = stem.rfind("pod") {
            let uid = stem[idx + 3..].replace('_', "-");
            if is_uuid(&uid) {
                info.pod_uid = Some(Arc::from(uid.as_str()));
            }
        }
    }
    info
}

/// Fills in executable, container id and pod UID of events, with bounded caches.
#[derive(Debug)]
pub struct Enricher {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    executables: BoundedCache<(u32, Arc<str>), Option<Arc<str>>>,
    cgroups: BoundedCache<u64, CgroupInfo>,
    last_scan: Option<Instant>,
    min_rescan: Duration,
}

impl Enricher {
    /// An enricher reading `/proc` and the cgroup v2 hierarchy at `/sys/fs/cgroup`.
    pub fn new(cache_size: usize) -> Self {
        Self::with_roots(cache_size, "/proc".into(), "/sys/fs/cgroup".into())
    }

    /// An enricher with other roots (tests).
    pub fn with_roots(cache_size: usize, proc_root: PathBuf, cgroup_root: PathBuf) -> Self {
        Self {
            proc_root,
            cgroup_root,
            executables: BoundedCache::new(cache_size),
            cgroups: BoundedCache::new(cache_size),
            last_scan: None,
            min_rescan: Duration::from_secs(1),
        }
    }

    /// Adds what is known about the event's process and cgroup.
    pub fn enrich(&mut self, event: &mut ConnectionEvent) {
        if event.tgid != 0 {
            event.executable = self.executable(event.tgid, &event.comm);
        }
        if event.cgroup_id != 0 {
            let info = self.cgroup(event.cgroup_id);
            event.container_id = info.container_id;
            event.pod_uid = info.pod_uid;
        }
    }

    fn executable(&mut self, tgid: u32, comm: &Arc<str>) -> Option<Arc<str>> {
        // Keyed with comm too, so a reused pid running something else is looked up again.
        let key = (tgid, comm.clone());
        if let Some(hit) = self.executables.get(&key) {
            return hit.clone();
        }
        let exe = std::fs::read_link(self.proc_root.join(tgid.to_string()).join("exe"))
            .ok()
            .and_then(|p| {
                p.file_name()
                    .map(|n| Arc::from(n.to_string_lossy().trim_end_matches(" (deleted)")))
            });
        // A process that already exited is not cached: it may still be found next time only
        // if the pid is reused, which the comm key covers.
        if exe.is_some() {
            self.executables.insert(key, exe.clone());
        }
        exe
    }

    fn cgroup(&mut self, id: u64) -> CgroupInfo {
        if let Some(hit) = self.cgroups.get(&id) {
            return hit.clone();
        }
        let due = self
            .last_scan
            .is_none_or(|t| t.elapsed() >= self.min_rescan);
        if due {
            self.last_scan = Some(Instant::now());
            if let Some(path) = find_cgroup(&self.cgroup_root, id) {
                let rel = path
                    .strip_prefix(&self.cgroup_root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned();
                let info = parse_cgroup_path(&rel);
                self.cgroups.insert(id, info.clone());
                return info;
            }
        }
        CgroupInfo::default()
    }
}

/// Walks cgroupfs for the directory whose inode number is `id`.
fn find_cgroup(root: &Path, id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut stack = vec![root.to_path_buf()];
    // Bounded: a cgroup tree has thousands of directories at most on an edge node.
    let mut budget = 100_000usize;
    while let Some(dir) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        if meta.ino() == id {
            return Some(dir);
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                budget = budget.checked_sub(1)?;
                stack.push(entry.path());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f9e1d2c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    #[test]
    fn systemd_driver_paths() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod0c6a7c3e_5f1b_4f5e_9a43_6d7e8f9a0b1c.slice/\
             cri-containerd-{ID}.scope"
        );
        let info = parse_cgroup_path(&path);
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(
            info.pod_uid.as_deref(),
            Some("0c6a7c3e-5f1b-4f5e-9a43-6d7e8f9a0b1c")
        );
    }

    #[test]
    fn cgroupfs_driver_paths() {
        let path = format!("/kubepods/burstable/pod0c6a7c3e-5f1b-4f5e-9a43-6d7e8f9a0b1c/{ID}");
        let info = parse_cgroup_path(&path);
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert!(info.pod_uid.is_some());
        let docker = parse_cgroup_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(docker.container_id.as_deref(), Some(ID));
        assert_eq!(docker.pod_uid, None);
    }

    #[test]
    fn plain_paths_have_nothing() {
        assert_eq!(
            parse_cgroup_path("/user.slice/user-0.slice/session-3.scope"),
            CgroupInfo::default()
        );
        assert_eq!(parse_cgroup_path(""), CgroupInfo::default());
    }

    #[test]
    fn cache_is_bounded() {
        let mut c = BoundedCache::new(2);
        c.insert(1, "a");
        c.insert(2, "b");
        c.insert(3, "c");
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&1), None);
        assert_eq!(c.get(&3), Some(&"c"));
    }

    #[test]
    fn cgroup_found_by_inode_in_a_fake_tree() {
        use std::os::unix::fs::MetadataExt as _;
        let root = tempfile::tempdir().unwrap();
        let dir = root
            .path()
            .join("kubepods.slice")
            .join(format!("cri-containerd-{ID}.scope"));
        std::fs::create_dir_all(&dir).unwrap();
        let ino = std::fs::metadata(&dir).unwrap().ino();
        let mut e = Enricher::with_roots(8, "/proc".into(), root.path().to_path_buf());
        assert_eq!(e.cgroup(ino).container_id.as_deref(), Some(ID));
        assert_eq!(e.cgroups.len(), 1);
    }
}
