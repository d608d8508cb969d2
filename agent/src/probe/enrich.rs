//! Enrichment: executable name of the process, container id and Kubernetes pod UID from the
//! task's cgroup path. Both caches are bounded; the cgroup path comes from cgroupfs (the
//! cgroup v2 id is the inode number of the cgroup's directory), never from a shell-out.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::event::{ConnectionEvent, SmolStr};

/// A map that holds at most `capacity` entries and forgets the oldest inserted first.
#[derive(Debug)]
pub struct BoundedCache<K, V> {
    map: HashMap<K, V, rustc_hash::FxBuildHasher>,
    order: VecDeque<K>,
    capacity: usize,
    /// The entry found last: most lookups in a row are for the same few processes, and a
    /// repeat skips the hashing.
    last: Option<(K, V)>,
}

impl<K: Hash + Eq + Clone, V: Clone> BoundedCache<K, V> {
    /// An empty cache of at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            last: None,
        }
    }

    /// The value for `key`.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        if !matches!(&self.last, Some((k, _)) if k == key) {
            let value = self.map.get(key)?.clone();
            self.last = Some((key.clone(), value));
        }
        self.last.as_ref().map(|(_, v)| v)
    }

    /// Inserts, evicting the oldest entry when full.
    pub fn insert(&mut self, key: K, value: V) {
        // The remembered entry may be the one replaced or evicted.
        self.last = None;
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
    executables: BoundedCache<(u32, SmolStr), Option<SmolStr>>,
    cgroups: BoundedCache<u64, CgroupInfo>,
    /// Reads of `/proc/PID/exe` so far.
    exe_reads: u64,
    /// Walks of cgroupfs so far.
    scans: u64,
}

impl Enricher {
    /// An enricher reading `/proc` and the cgroup v2 hierarchy where it is mounted (found in
    /// `/proc/self/mountinfo`: `/sys/fs/cgroup` on unified hosts, often
    /// `/sys/fs/cgroup/unified` on hybrid ones).
    pub fn new(cache_size: usize) -> Self {
        Self::with_roots(cache_size, "/proc".into(), cgroup2_root())
    }

    /// An enricher with other roots (tests).
    pub fn with_roots(cache_size: usize, proc_root: PathBuf, cgroup_root: PathBuf) -> Self {
        Self {
            proc_root,
            cgroup_root,
            executables: BoundedCache::new(cache_size),
            cgroups: BoundedCache::new(cache_size),
            exe_reads: 0,
            scans: 0,
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

    fn executable(&mut self, tgid: u32, comm: &SmolStr) -> Option<SmolStr> {
        // Keyed with comm too, so a reused pid running something else is looked up again.
        let key = (tgid, comm.clone());
        if let Some(hit) = self.executables.get(&key) {
            return hit.clone();
        }
        self.exe_reads += 1;
        let exe = match std::fs::read_link(self.proc_root.join(tgid.to_string()).join("exe")) {
            Ok(path) => path
                .file_name()
                .map(|n| SmolStr::new(n.to_string_lossy().trim_end_matches(" (deleted)"))),
            // The process has exited (or is a kernel thread): not cached, so that a reused pid
            // with the same comm is looked up again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            // Refused: reading another process's exe link takes ptrace read access, which the
            // shipped capability set lacks for most processes (docs/operators.md). The
            // process's name (its main thread's comm, `Name` in /proc/PID/status) is readable
            // by anyone and is what OpenTelemetry's `process.executable.name` allows on Linux;
            // it beats the event's own comm, which is the name of whichever thread made the
            // call. Cached either way: the answer will not change while the process lives, and
            // asking again for every event costs a path walk and a permission check each time.
            Err(_) => match std::fs::read(self.proc_root.join(tgid.to_string()).join("comm")) {
                Ok(name) => {
                    let name = String::from_utf8_lossy(&name);
                    let name = name.trim_end_matches('\n');
                    (!name.is_empty()).then(|| SmolStr::new(name))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                Err(_) => None,
            },
        };
        self.executables.insert(key, exe.clone());
        exe
    }

    fn cgroup(&mut self, id: u64) -> CgroupInfo {
        if let Some(hit) = self.cgroups.get(&id) {
            return hit.clone();
        }
        // One walk of cgroupfs per cgroup never seen before (cgroup ids are not reused within
        // a boot); the walk caches what it finds on the way, and a miss is cached too.
        self.scans += 1;
        let mut found = CgroupInfo::default();
        let root = self.cgroup_root.clone();
        walk_cgroups(&root, |ino, path| {
            let rel = path.strip_prefix(&root).unwrap_or(path).to_string_lossy();
            let info = parse_cgroup_path(&rel);
            if ino == id {
                found = info.clone();
            }
            if info != CgroupInfo::default() || ino == id {
                self.cgroups.insert(ino, info);
            }
        });
        self.cgroups.insert(id, found.clone());
        found
    }
}

/// Where this host mounts the cgroup v2 hierarchy (from `/proc/self/mountinfo`;
/// `/sys/fs/cgroup` when it cannot be told).
pub fn cgroup2_root() -> PathBuf {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| cgroup2_mount(&m))
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// The mount point of the cgroup v2 hierarchy in a mountinfo text. The id the kernel reports
/// (`bpf_get_current_cgroup_id`) is an inode number in that hierarchy only: cgroup v1
/// hierarchies have their own inode numbers and must not be searched.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Calls `visit(inode, path)` for every directory of the cgroup tree under `root`.
fn walk_cgroups(root: &Path, mut visit: impl FnMut(u64, &Path)) {
    use std::os::unix::fs::MetadataExt as _;
    let mut stack = vec![root.to_path_buf()];
    // Bounded: a cgroup tree has thousands of directories at most on an edge node.
    let mut budget = 100_000usize;
    while let Some(dir) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        visit(meta.ino(), &dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let Some(left) = budget.checked_sub(1) else {
                    return;
                };
                budget = left;
                stack.push(entry.path());
            }
        }
    }
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
    fn cgroup2_mount_point_from_mountinfo() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                      36 25 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("35 25 0:30 / /sys rw - sysfs sysfs rw\n"),
            None
        );
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
        // Unknown ids cost one walk each, then come from the cache.
        assert_eq!(e.cgroup(u64::MAX), CgroupInfo::default());
        assert_eq!(e.cgroup(u64::MAX), CgroupInfo::default());
        assert_eq!(e.cgroup(ino).container_id.as_deref(), Some(ID));
        assert_eq!(e.scans, 2);
    }

    #[test]
    fn executables_refused_fall_back_to_the_process_name_and_are_cached() {
        let proc_root = tempfile::tempdir().unwrap();
        let comm = SmolStr::new("server");
        // Found: cached.
        let found = proc_root.path().join("10");
        std::fs::create_dir(&found).unwrap();
        std::os::unix::fs::symlink("/usr/sbin/server (deleted)", found.join("exe")).unwrap();
        // Refused: an `exe` that cannot be read as a link (here a plain file, EINVAL; in
        // /proc, EACCES without ptrace access) gives the process's name from `comm`, cached.
        let refused = proc_root.path().join("20");
        std::fs::create_dir(&refused).unwrap();
        std::fs::write(refused.join("exe"), b"").unwrap();
        std::fs::write(refused.join("comm"), b"main-thread\n").unwrap();
        // Refused with no name to fall back on: cached as unknown.
        let nameless = proc_root.path().join("40");
        std::fs::create_dir(&nameless).unwrap();
        std::fs::write(nameless.join("exe"), b"").unwrap();
        std::fs::create_dir(nameless.join("comm")).unwrap();
        // Exited (no directory): asked again next time.
        let mut e = Enricher::with_roots(8, proc_root.path().to_path_buf(), "/nonexistent".into());
        for _ in 0..3 {
            assert_eq!(e.executable(10, &comm).as_deref(), Some("server"));
            assert_eq!(e.executable(20, &comm).as_deref(), Some("main-thread"));
            assert_eq!(e.executable(30, &comm), None);
            assert_eq!(e.executable(40, &comm), None);
        }
        assert_eq!(e.exe_reads, 1 + 1 + 3 + 1);
    }
}
