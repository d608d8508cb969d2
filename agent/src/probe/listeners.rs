//! Listening sockets that were open before the probe started, and the processes that hold them.
//!
//! The kernel programs write a record for every listener created while they run (`listen()`
//! runs in the owner's context), and the agent attributes each passive open to the owner of
//! the listener on its port, from the handshake on. A listener opened before the probe (every
//! server on the node when the agent restarts) is found here once, at start, in /proc:
//! `/proc/PID/ns/net` gives each process's network namespace, `/proc/PID/fd` its sockets (by
//! inode), and `/proc/PID/net/tcp{,6}` of one process per namespace that namespace's listening
//! sockets. The tracker takes them without replacing what the kernel's listen records say.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::tracker::Owner;

/// A listening TCP socket and the process that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Inode number of its network namespace.
    pub netns: u32,
    /// Local port.
    pub port: u16,
    /// Who holds it.
    pub owner: Owner,
}

/// The listening TCP sockets (IPv4 and IPv6) visible under `proc_root` with the process that
/// holds each; `cgroup_root` is where the cgroup v2 hierarchy is mounted (for the owner's
/// cgroup id). A socket held by several processes (inherited by forked workers) goes to the
/// one with the lowest pid, usually the parent that opened it. Processes that vanish during
/// the walk are skipped.
pub fn scan(proc_root: &Path, cgroup_root: &Path) -> Vec<Listener> {
    // Socket inode -> lowest pid holding it; network namespace -> one pid in it.
    let mut holders: HashMap<u64, u32> = HashMap::new();
    let mut namespaces: HashMap<u32, u32> = HashMap::new();
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for &pid in &pids {
        let dir = proc_root.join(pid.to_string());
        let Some(netns) =
            link_number(&dir.join("ns/net"), "net").and_then(|n| u32::try_from(n).ok())
        else {
            continue;
        };
        namespaces.entry(netns).or_insert(pid);
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Some(inode) = link_number(&fd.path(), "socket") {
                holders.entry(inode).or_insert(pid);
            }
        }
    }
    let mut found = Vec::new();
    for (&netns, &pid) in &namespaces {
        for table in ["net/tcp", "net/tcp6"] {
            let path = proc_root.join(pid.to_string()).join(table);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for (port, inode) in listening(&text) {
                // Held by a process in this namespace (a socket can be passed elsewhere, but
                // the table is the namespace's own).
                let Some(&holder) = holders.get(&inode) else {
                    continue;
                };
                if let Some(owner) = owner_of(proc_root, cgroup_root, holder) {
                    found.push(Listener { netns, port, owner });
                }
            }
        }
    }
    found.sort_by_key(|l| (l.netns, l.port, l.owner.pid));
    found.dedup_by_key(|l| (l.netns, l.port));
    found
}

/// The owner record of process `pid`: its comm and cgroup v2 id (0 when the cgroup cannot be
/// found).
fn owner_of(proc_root: &Path, cgroup_root: &Path, pid: u32) -> Option<Owner> {
    let dir = proc_root.join(pid.to_string());
    let name = std::fs::read_to_string(dir.join("comm")).ok()?;
    let mut comm = [0u8; 16];
    let name = name.trim_end_matches('\n').as_bytes();
    let len = name.len().min(15);
    comm[..len].copy_from_slice(&name[..len]);
    let cgroup_id = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|text| cgroup_v2_path(&text).map(|p| cgroup_dir(cgroup_root, p)))
        .and_then(|dir| std::fs::metadata(dir).ok())
        .map(|m| m.ino())
        .unwrap_or(0);
    Some(Owner {
        cgroup_id,
        pid,
        tgid: pid,
        comm,
    })
}

/// `N` from a symbolic link to `kind:[N]` (`net:[4026531840]`, `socket:[81234]`).
fn link_number(link: &Path, kind: &str) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    bracketed(target.to_str()?, kind)
}

/// `N` from `kind:[N]`.
fn bracketed(text: &str, kind: &str) -> Option<u64> {
    text.strip_prefix(kind)?
        .strip_prefix(":[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// `(local port, inode)` of every socket in state LISTEN (`0A`) in a `/proc/net/tcp` or
/// `/proc/net/tcp6` table.
fn listening(table: &str) -> impl Iterator<Item = (u16, u64)> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        if state != "0A" {
            return None;
        }
        let inode: u64 = fields.nth(5)?.parse().ok()?;
        let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
        (inode != 0).then_some((port, inode))
    })
}

/// The cgroup v2 path in a `/proc/PID/cgroup` text (its `0::` line).
fn cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

/// The directory of cgroup `path` (absolute in the hierarchy) under the mount `root`.
fn cgroup_dir(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_read_from_the_tcp_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 48211 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 48300 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(
            listening(v4).collect::<Vec<_>>(),
            [(8080, 48211)],
            "established sockets and sockets without an inode are left out"
        );
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 51234 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(listening(v6).collect::<Vec<_>>(), [(443, 51234)]);
        assert_eq!(listening("").count(), 0);
        assert_eq!(listening("header\n   0: garbage").count(), 0);
    }

    #[test]
    fn link_targets_and_cgroup_lines_are_parsed() {
        assert_eq!(bracketed("net:[4026531840]", "net"), Some(4_026_531_840));
        assert_eq!(bracketed("socket:[81234]", "socket"), Some(81_234));
        assert_eq!(bracketed("pipe:[81234]", "socket"), None);
        assert_eq!(bracketed("/dev/null", "socket"), None);
        let cgroup = "12:pids:/legacy\n0::/kubepods.slice/cri-containerd-ab.scope\n";
        assert_eq!(
            cgroup_v2_path(cgroup),
            Some("/kubepods.slice/cri-containerd-ab.scope")
        );
        assert_eq!(
            cgroup_dir(Path::new("/sys/fs/cgroup"), "/a/b"),
            PathBuf::from("/sys/fs/cgroup/a/b")
        );
        assert_eq!(
            cgroup_dir(Path::new("/sys/fs/cgroup"), "/"),
            PathBuf::from("/sys/fs/cgroup/")
        );
    }

    #[test]
    fn this_process_listener_is_found_with_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let found = scan(Path::new("/proc"), &super::super::enrich::cgroup2_root());
        let me = std::process::id();
        let ours = found
            .iter()
            .find(|l| l.port == port && l.owner.tgid == me)
            .unwrap_or_else(|| panic!("port {port} of pid {me} not in {found:#?}"));
        let netns = link_number(Path::new("/proc/self/ns/net"), "net").unwrap();
        assert_eq!(u64::from(ours.netns), netns);
        assert_ne!(ours.owner.comm, [0; 16]);
        drop(listener);
    }
}
