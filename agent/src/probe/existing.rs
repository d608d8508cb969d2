//! Sockets that were open before the probe started: listeners, and connections.
//!
//! The kernel programs see a connection begin (its connect or accept record) and a listener
//! open (its listen record) only while they run. Whatever was open before (every server and
//! every long-lived connection on the node when the agent restarts) is found here once, at
//! start, after the programs are attached: `/proc/PID/ns/net` gives each process's network
//! namespace, `/proc/PID/fd` its sockets (by inode), and `/proc/PID/net/tcp{,6}` of one
//! process per namespace that namespace's TCP sockets.
//!
//! - **Listeners** name the owner of passive opens on their port from the handshake on. The
//!   tracker takes them without replacing what the kernel's listen records say.
//! - **Connections** are adopted by the tracker and announced at once. Where the tables show
//!   each socket's kernel address (`kernel.kptr_restrict` 1 and a reader with `CAP_SYSLOG`),
//!   the tracker keys them as it keys the connections it saw start, so they get updates and
//!   their close as those do. Where the addresses are hidden or hashed, the probe looks the
//!   sockets up by their addresses (`lookup.rs`); one it cannot find is held by network
//!   namespace and addresses, to which its close record is matched, and gets no updates.
//!
//! Reading another process's `/proc/PID/ns/net` and `/proc/PID/fd` takes what `ptrace` read
//! access takes: the same uid and no capability the agent lacks, or `CAP_SYS_PTRACE`. The
//! processes the agent may not read are counted ([`Existing::unreadable`]), and the agent says
//! so: which of the sockets they hold is unknown, and so are the sockets of a namespace where
//! it can read no process (the agent's own namespace always has one: the agent).
//!
//! The tables do not say who opened a connection: one whose local port is a listening port of
//! its namespace is taken for a passive open, any other for an active one.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use edgeward_common::HeldSocket;

use super::{
    decode::{TCP_CLOSE, TCP_LISTEN, TCP_NEW_SYN_RECV, TCP_SYN_RECV, TCP_SYN_SENT, TCP_TIME_WAIT},
    tracker::Owner,
};

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

/// One end of a TCP connection open at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Kernel address of the socket, when the tables show it.
    pub sk: Option<u64>,
    /// The socket's inode; 0 for a socket without a file.
    pub inode: u64,
    /// Inode number of its network namespace.
    pub netns: u32,
    /// `AF_INET` or `AF_INET6`: the table it is in.
    pub family: u16,
    /// Local address (IPv4 as v4-mapped IPv6, as the kernel's records have it) and port.
    pub local: ([u8; 16], u16),
    /// Peer address and port.
    pub peer: ([u8; 16], u16),
    /// Its local port is a listening port of its namespace.
    pub passive: bool,
    /// Still connecting (`SYN_SENT`): an active open whose handshake has not completed.
    pub connecting: bool,
    /// The process that holds the socket; `None` for a socket no process holds (closed by
    /// its owner, still finishing its close in the kernel).
    pub owner: Option<Owner>,
}

/// What [`scan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// Listening sockets held by a process.
    pub listeners: Vec<Listener>,
    /// Connection ends, at most the `limit` given to [`scan`].
    pub connections: Vec<Connection>,
    /// Connections left out because there were more than the limit.
    pub over_limit: usize,
    /// Processes whose network namespace or sockets could not be read (not those that
    /// exited during the walk); with the kernel's list of held sockets, network namespaces
    /// whose tables no process holding their sockets shows.
    pub unreadable: usize,
    /// The first of those errors, with its path.
    pub unreadable_error: Option<String>,
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The TCP sockets (IPv4 and IPv6) visible under `proc_root`, with the process that holds
/// each; `cgroup_root` is where the cgroup v2 hierarchy is mounted (for the owner's cgroup
/// id). At most `limit` connection ends are returned. A socket held by several processes
/// (inherited by forked workers) goes to the one with the lowest pid, usually the parent that
/// opened it. Processes that vanish during the walk are skipped.
///
/// `held` is what the kernel's `held_sockets` iterator found, when it could run: every TCP
/// socket a process holds, with its network namespace. It stands in for `/proc/PID/fd` and
/// `/proc/PID/ns/net`, which take `ptrace` access; the namespaces' tables
/// (`/proc/PID/net/tcp`) are open to all. Without it those links are read.
pub fn scan(
    proc_root: &Path,
    cgroup_root: &Path,
    limit: usize,
    held: Option<&[HeldSocket]>,
) -> Existing {
    let sources = match held {
        Some(held) => Sources::from_held(proc_root, held),
        None => Sources::from_proc(proc_root),
    };
    let Sources {
        holders,
        namespaces,
        addresses,
        cgroups,
        unreadable,
        unreadable_error,
    } = sources;
    let mut owners: HashMap<u32, Option<Owner>> = HashMap::new();
    let mut owner = |pid: u32| {
        *owners
            .entry(pid)
            .or_insert_with(|| owner_of(proc_root, cgroup_root, pid, cgroups.get(&pid).copied()))
    };
    let mut found = Existing {
        unreadable,
        unreadable_error,
        ..Existing::default()
    };
    for (netns, rows) in namespaces {
        let listening: HashSet<u16> = rows
            .iter()
            .filter(|(_, row)| row.state == TCP_LISTEN)
            .map(|(_, row)| row.local.1)
            .collect();
        for (family, row) in rows {
            // Held by a process in this namespace (a socket can be passed elsewhere, but the
            // table is the namespace's own).
            let holder = holders.get(&row.inode).copied();
            match row.state {
                TCP_LISTEN => {
                    if let Some(owner) = holder.and_then(&mut owner) {
                        found.listeners.push(Listener {
                            netns,
                            port: row.local.1,
                            owner,
                        });
                    }
                }
                // Not full sockets (request and time-wait sockets: the kernel has closed the
                // connection, or not opened it yet), or closed already.
                TCP_SYN_RECV | TCP_NEW_SYN_RECV | TCP_TIME_WAIT | TCP_CLOSE => {}
                _ if found.connections.len() >= limit => found.over_limit += 1,
                _ => found.connections.push(Connection {
                    // The iterator's address is the kernel's own; the table's may be hidden.
                    sk: addresses.get(&row.inode).copied().or(row.sk),
                    inode: row.inode,
                    netns,
                    family,
                    local: row.local,
                    peer: row.remote,
                    passive: listening.contains(&row.local.1),
                    connecting: row.state == TCP_SYN_SENT,
                    owner: holder.and_then(&mut owner),
                }),
            }
        }
    }
    found
        .listeners
        .sort_by_key(|l| (l.netns, l.port, l.owner.pid));
    found.listeners.dedup_by_key(|l| (l.netns, l.port));
    found
}

/// Who holds which socket, and each network namespace's TCP sockets.
struct Sources {
    /// Socket inode -> the lowest pid holding it.
    holders: HashMap<u64, u32>,
    /// Each network namespace's TCP table rows, by namespace inode (sorted).
    namespaces: Vec<(u32, Vec<(u16, Row)>)>,
    /// Socket inode -> the socket's kernel address, where known apart from the tables.
    addresses: HashMap<u64, u64>,
    /// Process -> its cgroup v2 id, where known apart from /proc (the kernel's). Read from
    /// `/proc/PID/cgroup`, the path is relative to the agent's cgroup namespace, and from a
    /// namespace of its own (a container's) it names the wrong cgroup or none.
    cgroups: HashMap<u32, u64>,
    /// Processes, or namespaces, whose sockets could not be read.
    unreadable: usize,
    /// The first of those errors.
    unreadable_error: Option<String>,
}

/// The rows of the TCP tables (`net/tcp`, `net/tcp6`) of the namespace of process `pid`.
fn tables(proc_root: &Path, pid: &str) -> Vec<(u16, Row)> {
    let mut rows = Vec::new();
    for (table, family) in [("net/tcp", AF_INET), ("net/tcp6", AF_INET6)] {
        let path = proc_root.join(pid).join(table);
        if let Ok(text) = std::fs::read_to_string(&path) {
            rows.extend(parse_rows(&text).map(|row| (family, row)));
        }
    }
    rows
}

/// How many processes holding sockets of a namespace are tried for its tables (a process
/// may hold a socket of a namespace other than its own).
const TABLE_TRIES: usize = 8;

impl Sources {
    /// From the iterator's sockets. A namespace's tables are those of a process holding one
    /// of its sockets, checked to list that socket (a socket can be handed to a process of
    /// another namespace); the agent's own namespace is read through the agent.
    fn from_held(proc_root: &Path, held: &[HeldSocket]) -> Self {
        let mut holders: HashMap<u64, u32> = HashMap::new();
        let mut addresses = HashMap::new();
        let mut by_namespace: HashMap<u32, (Vec<u32>, HashSet<u64>)> = HashMap::new();
        let mut cgroups = HashMap::new();
        for h in held {
            if h.cgroup_id != 0 {
                cgroups.insert(h.tgid, h.cgroup_id);
            }
            let holder = holders.entry(h.inode).or_insert(h.tgid);
            *holder = (*holder).min(h.tgid);
            addresses.insert(h.inode, h.sk);
            let (pids, inodes) = by_namespace.entry(h.netns).or_default();
            pids.push(h.tgid);
            inodes.insert(h.inode);
        }
        let own = link_number(&proc_root.join("self/ns/net"), "net")
            .ok()
            .flatten()
            .and_then(|n| u32::try_from(n).ok());
        let (mut unreadable, mut unreadable_error) = (0, None);
        let mut namespaces = Vec::new();
        if let Some(own) = own {
            by_namespace.remove(&own);
            namespaces.push((own, tables(proc_root, "self")));
        }
        for (netns, (mut pids, inodes)) in by_namespace {
            pids.sort_unstable();
            pids.dedup();
            let rows = pids.iter().take(TABLE_TRIES).find_map(|pid| {
                let rows = tables(proc_root, &pid.to_string());
                rows.iter()
                    .any(|(_, row)| inodes.contains(&row.inode))
                    .then_some(rows)
            });
            match rows {
                Some(rows) => namespaces.push((netns, rows)),
                None => {
                    unreadable += 1;
                    unreadable_error.get_or_insert_with(|| {
                        format!(
                            "network namespace {netns}: no process holding its sockets (pids {pids:?}) lists them in its net/tcp"
                        )
                    });
                }
            }
        }
        namespaces.sort_unstable_by_key(|(netns, _)| *netns);
        Self {
            holders,
            namespaces,
            addresses,
            cgroups,
            unreadable,
            unreadable_error,
        }
    }

    /// From each process's `/proc/PID/ns/net` and `/proc/PID/fd`, where the agent may read
    /// them.
    fn from_proc(proc_root: &Path) -> Self {
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
        let (mut unreadable, mut unreadable_error) = (0, None);
        let mut refused = |path: PathBuf, e: std::io::Error| {
            // A process that exited during the walk is simply gone.
            if e.kind() != std::io::ErrorKind::NotFound && e.raw_os_error() != Some(libc::ESRCH) {
                unreadable += 1;
                unreadable_error.get_or_insert_with(|| format!("{}: {e}", path.display()));
            }
        };
        for &pid in &pids {
            let dir = proc_root.join(pid.to_string());
            let ns = dir.join("ns/net");
            let netns = match link_number(&ns, "net") {
                Ok(n) => n,
                Err(e) => {
                    refused(ns, e);
                    continue;
                }
            };
            let Some(netns) = netns.and_then(|n| u32::try_from(n).ok()) else {
                continue;
            };
            namespaces.entry(netns).or_insert(pid);
            let fds = match std::fs::read_dir(dir.join("fd")) {
                Ok(fds) => fds,
                Err(e) => {
                    refused(dir.join("fd"), e);
                    continue;
                }
            };
            for fd in fds.flatten() {
                if let Ok(Some(inode)) = link_number(&fd.path(), "socket") {
                    holders.entry(inode).or_insert(pid);
                }
            }
        }
        let mut namespaces: Vec<(u32, u32)> = namespaces.into_iter().collect();
        namespaces.sort_unstable();
        Self {
            holders,
            namespaces: namespaces
                .into_iter()
                .map(|(netns, pid)| (netns, tables(proc_root, &pid.to_string())))
                .collect(),
            addresses: HashMap::new(),
            cgroups: HashMap::new(),
            unreadable,
            unreadable_error,
        }
    }
}

/// The owner record of process `pid`: its comm and cgroup v2 id: `cgroup_id` when the kernel
/// gave it, else from /proc (0 when the cgroup cannot be found).
fn owner_of(
    proc_root: &Path,
    cgroup_root: &Path,
    pid: u32,
    cgroup_id: Option<u64>,
) -> Option<Owner> {
    let dir = proc_root.join(pid.to_string());
    let name = std::fs::read_to_string(dir.join("comm")).ok()?;
    let mut comm = [0u8; 16];
    let name = name.trim_end_matches('\n').as_bytes();
    let len = name.len().min(15);
    comm[..len].copy_from_slice(&name[..len]);
    let cgroup_id = cgroup_id.unwrap_or_else(|| {
        std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|text| cgroup_v2_path(&text).map(|p| cgroup_dir(cgroup_root, p)))
            .and_then(|dir| std::fs::metadata(dir).ok())
            .map(|m| m.ino())
            .unwrap_or(0)
    });
    Some(Owner {
        cgroup_id,
        pid,
        tgid: pid,
        comm,
    })
}

/// `N` from a symbolic link to `kind:[N]` (`net:[4026531840]`, `socket:[81234]`); `None`
/// when the link points elsewhere, the error when it cannot be read.
fn link_number(link: &Path, kind: &str) -> std::io::Result<Option<u64>> {
    let target = std::fs::read_link(link)?;
    Ok(target.to_str().and_then(|t| bracketed(t, kind)))
}

/// `N` from `kind:[N]`.
fn bracketed(text: &str, kind: &str) -> Option<u64> {
    text.strip_prefix(kind)?
        .strip_prefix(":[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// One socket of a `/proc/net/tcp` or `/proc/net/tcp6` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    local: ([u8; 16], u16),
    remote: ([u8; 16], u16),
    state: u8,
    /// 0 for a socket without a file (orphaned, request, time-wait).
    inode: u64,
    /// The socket's kernel address; `None` when the kernel hides it.
    sk: Option<u64>,
}

/// The sockets of a table; lines that do not parse are skipped.
fn parse_rows(table: &str) -> impl Iterator<Item = Row> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode refcnt pointer ...
        if fields.len() < 12 {
            return None;
        }
        Some(Row {
            local: endpoint(fields[1])?,
            remote: endpoint(fields[2])?,
            state: u8::from_str_radix(fields[3], 16).ok()?,
            inode: fields[9].parse().ok()?,
            sk: u64::from_str_radix(fields[11], 16)
                .ok()
                .filter(|&p| is_kernel_address(p)),
        })
    })
}

/// Whether the pointer column of a table shows a kernel address. The column is `%pK`: with
/// `kernel.kptr_restrict` 1 it is the address to a reader with `CAP_SYSLOG`, and zeroes to
/// others; with 2, zeroes; with 0, a hash of the address (Linux 4.15 on), which on 64-bit
/// kernels has its upper 32 bits clear, where kernel addresses have them set.
fn is_kernel_address(p: u64) -> bool {
    p >> 32 != 0
}

/// `ADDR:PORT` of a table: the address as the kernel's 32-bit words in memory order, each
/// printed as a hex number (8 digits for IPv4, 32 for IPv6), the port in hex. IPv4 comes
/// back v4-mapped.
fn endpoint(text: &str) -> Option<([u8; 16], u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = [0u8; 16];
    match addr.len() {
        8 => {
            bytes = Ipv4Addr::from(word(addr)?.to_ne_bytes())
                .to_ipv6_mapped()
                .octets()
        }
        32 => {
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(8 * i..8 * i + 8)?)?.to_ne_bytes());
            }
        }
        _ => return None,
    }
    Some((bytes, port))
}

fn word(hex: &str) -> Option<u32> {
    u32::from_str_radix(hex, 16).ok()
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

    fn v4(a: [u8; 4]) -> [u8; 16] {
        Ipv4Addr::from(a).to_ipv6_mapped().octets()
    }

    #[test]
    fn processes_that_cannot_be_read_are_counted_and_those_gone_are_not() {
        let proc = tempfile::tempdir().unwrap();
        let p = |rel: &str| proc.path().join(rel);
        // 100: readable, holds a listener on port 8080.
        for dir in ["100/ns", "100/fd", "100/net", "200/ns", "300"] {
            std::fs::create_dir_all(p(dir)).unwrap();
        }
        std::os::unix::fs::symlink("net:[4026531840]", p("100/ns/net")).unwrap();
        std::os::unix::fs::symlink("socket:[77]", p("100/fd/3")).unwrap();
        std::fs::write(p("100/comm"), "server\n").unwrap();
        std::fs::write(
            p("100/net/tcp"),
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
             0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n",
        )
        .unwrap();
        // 200: its namespace link cannot be read (as without ptrace access).
        std::fs::write(p("200/ns/net"), "").unwrap();
        // 300: exited during the walk.
        let found = scan(proc.path(), proc.path(), 10, None);
        assert_eq!(found.listeners.len(), 1, "{found:#?}");
        assert_eq!(found.listeners[0].port, 8080);
        assert_eq!(found.unreadable, 1, "{found:#?}");
        let error = found.unreadable_error.unwrap();
        assert!(error.contains("200/ns/net"), "{error}");
    }

    #[test]
    fn held_sockets_stand_in_for_the_links_proc_guards() {
        let proc = tempfile::tempdir().unwrap();
        let p = |rel: &str| proc.path().join(rel);
        // Neither process's ns/net nor fd can be read (no such entries at all here); their
        // namespaces' tables can. 100 and 200 share namespace 5; 300 holds a socket of
        // namespace 7 but lives in another whose table does not list it; 400 is in 7.
        let head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let row = |sl: u32, local: &str, remote: &str, state: &str, inode: u64| {
            format!(
                "   {sl}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
            )
        };
        let ns5 = format!(
            "{head}{}{}{}",
            row(0, "0100007F:1F90", "00000000:0000", "0A", 11),
            row(1, "0100007F:1F90", "0100007F:C350", "01", 12),
            row(2, "0100007F:C350", "0100007F:1F90", "01", 13),
        );
        let ns7 = format!(
            "{head}{}",
            row(0, "0A000001:0050", "0A000002:D000", "01", 21)
        );
        for (pid, table, comm) in [
            ("100", ns5.as_str(), "server"),
            ("200", ns5.as_str(), "client"),
            ("300", head, "stray"),
            ("400", ns7.as_str(), "pod"),
        ] {
            std::fs::create_dir_all(p(&format!("{pid}/net"))).unwrap();
            std::fs::write(p(&format!("{pid}/net/tcp")), table).unwrap();
            std::fs::write(p(&format!("{pid}/comm")), format!("{comm}\n")).unwrap();
        }
        // The kernel gives the server's cgroup; the others' come from /proc (none here).
        let held = |sk: u64, inode: u64, tgid: u32, netns: u32| HeldSocket {
            sk,
            inode,
            tgid,
            netns,
            cgroup_id: if tgid == 100 { 7777 } else { 0 },
        };
        let held = [
            held(0xffff_0000_0000_0011, 11, 100, 5),
            held(0xffff_0000_0000_0012, 12, 100, 5),
            // Inherited by a forked worker: the lowest pid keeps it.
            held(0xffff_0000_0000_0012, 12, 150, 5),
            held(0xffff_0000_0000_0013, 13, 200, 5),
            held(0xffff_0000_0000_0021, 21, 300, 7),
            held(0xffff_0000_0000_0021, 21, 400, 7),
        ];
        let found = scan(proc.path(), proc.path(), 10, Some(&held));
        assert_eq!((found.unreadable, found.over_limit), (0, 0), "{found:#?}");
        assert_eq!(found.listeners.len(), 1, "{found:#?}");
        let l = &found.listeners[0];
        assert_eq!((l.netns, l.owner.pid, l.owner.cgroup_id), (5, 100, 7777));
        let ends: Vec<_> = found
            .connections
            .iter()
            .map(|c| {
                let owner = c.owner.map(|o| (o.pid, o.cgroup_id));
                (c.netns, c.inode, c.sk, c.passive, owner)
            })
            .collect();
        assert_eq!(
            ends,
            [
                (5, 12, Some(0xffff_0000_0000_0012), true, Some((100, 7777))),
                (5, 13, Some(0xffff_0000_0000_0013), false, Some((200, 0))),
                (7, 21, Some(0xffff_0000_0000_0021), false, Some((300, 0))),
            ]
        );
        // A namespace none of whose holders shows it is counted, and named.
        let found = scan(proc.path(), proc.path(), 10, Some(&held[4..5]));
        assert_eq!(found.unreadable, 1, "{found:#?}");
        assert!(
            found
                .unreadable_error
                .as_deref()
                .unwrap()
                .contains("network namespace 7"),
            "{found:#?}"
        );
    }

    #[test]
    fn sockets_are_read_from_the_tcp_tables() {
        let v4_table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 48211 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0200007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 48300 1 ffff8f0a12345678 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
   3: garbage
   4: 0100007F:1F90 0300007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 48301 1 00000000a1b2c3d4 20 4 30 10 -1
";
        let rows: Vec<Row> = parse_rows(v4_table).collect();
        assert_eq!(rows.len(), 4, "{rows:#?}");
        assert_eq!(
            rows[0],
            Row {
                local: (v4([127, 0, 0, 1]), 8080),
                remote: (v4([0, 0, 0, 0]), 0),
                state: TCP_LISTEN,
                inode: 48211,
                sk: None,
            }
        );
        assert_eq!(rows[1].remote, (v4([127, 0, 0, 2]), 50000));
        assert_eq!(rows[1].state, 1);
        assert_eq!(rows[1].sk, Some(0xffff_8f0a_1234_5678));
        assert_eq!(rows[2].inode, 0);
        assert_eq!(rows[3].sk, None, "a hashed pointer (kptr_restrict 0)");
        let v6_table = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 51234 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:01BB 0000000000000000FFFF00000100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 51240 1 ffff8f0a00000040 100 0 0 10 0
";
        let rows: Vec<Row> = parse_rows(v6_table).collect();
        assert_eq!(rows[0].local.1, 443);
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        assert_eq!(
            rows[1].local,
            (loopback, 443),
            "::1 is the words 0, 0, 0, 0x01000000"
        );
        assert_eq!(rows[1].remote, (v4([127, 0, 0, 1]), 40000), "v4-mapped");
        assert_eq!(parse_rows("").count(), 0);
        assert_eq!(endpoint("0100007F"), None);
        assert_eq!(
            endpoint("0100007:1F90"),
            None,
            "an address of the wrong length"
        );
        assert_eq!(
            endpoint(&format!("0000000\u{e9}{}:0050", "0".repeat(23))),
            None,
            "32 bytes, not 32 hex digits"
        );
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
    fn this_process_sockets_are_found_with_their_owner_and_direction() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        let client_port = client.local_addr().unwrap().port();
        let found = scan(
            Path::new("/proc"),
            &super::super::enrich::cgroup2_root(),
            usize::MAX,
            None,
        );
        let me = std::process::id();
        let netns = link_number(Path::new("/proc/self/ns/net"), "net")
            .unwrap()
            .unwrap();
        let ours = found
            .listeners
            .iter()
            .find(|l| l.port == port && l.owner.tgid == me)
            .unwrap_or_else(|| panic!("port {port} of pid {me} not in {found:#?}"));
        assert_eq!(u64::from(ours.netns), netns);
        assert_ne!(ours.owner.comm, [0; 16]);
        let end = |local: u16, peer: u16| {
            found
                .connections
                .iter()
                .find(|c| c.local.1 == local && c.peer.1 == peer)
                .unwrap_or_else(|| panic!("{local} -> {peer} not in {found:#?}"))
        };
        let (active, passive) = (end(client_port, port), end(port, client_port));
        assert!(!active.passive && passive.passive);
        for c in [active, passive] {
            assert_eq!(c.owner.map(|o| o.tgid), Some(me), "{c:#?}");
            assert_eq!(u64::from(c.netns), netns);
            assert_eq!((c.family, c.local.0), (AF_INET, v4([127, 0, 0, 1])));
            assert!(!c.connecting);
        }
        let limited = scan(
            Path::new("/proc"),
            &super::super::enrich::cgroup2_root(),
            0,
            None,
        );
        assert!(limited.connections.is_empty());
        assert!(limited.over_limit >= 2, "{limited:#?}");
        drop((client, server, listener));
    }
}
