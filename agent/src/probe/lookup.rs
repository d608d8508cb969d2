//! The kernel addresses of the connections found open at start, where `/proc/net/tcp` hides
//! them (`kernel.kptr_restrict` 0 shows a hash, 2 shows zeroes, 1 shows zeroes to a reader
//! without `CAP_SYSLOG`).
//!
//! Without its socket's address the agent cannot have the kernel report on a connection, so
//! it would get no updates. The `conn_lookup` program finds the socket the way the kernel
//! finds the socket of an arriving packet (`bpf_sk_lookup_tcp`, by its four addresses), in
//! the network namespace of the thread that runs it (`BPF_PROG_TEST_RUN` of a cgroup skb
//! program, never attached; that type loads with `CAP_BPF` alone, where a classifier would
//! need `CAP_NET_ADMIN`). The agent runs it in its own namespace directly, and in each other
//! namespace from a short-lived thread that enters it (`setns`, which needs `CAP_SYS_ADMIN`);
//! where it cannot, those connections keep the path without an address.

use std::{collections::BTreeMap, fs::File, os::unix::fs::MetadataExt};

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{CgroupSkb, ProgramError, TestRun, TestRunOptions},
};
use edgeward_common::{LookupQuery, lookup};

use super::{ProbeError, error_chain, existing::Connection};

/// The program's name in the object.
pub const PROGRAM: &str = "conn_lookup";
/// The map it writes the socket's address into.
const ANSWER: &str = "LOOKUP_FOUND";

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Loads `conn_lookup`.
pub fn load(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let err = super::on_demand_error(PROGRAM);
    let prog: &mut CgroupSkb = super::program_as(ebpf, PROGRAM, err)?;
    prog.load().map_err(err)
}

/// The loaded `conn_lookup` and the map it answers in.
pub struct Lookup<'a> {
    prog: &'a CgroupSkb,
    answer: Array<&'a MapData, u64>,
}

impl<'a> Lookup<'a> {
    /// The program [`load`] loaded, with its answer map; `None` if either is missing.
    pub fn of(ebpf: &'a Ebpf) -> Option<Self> {
        let prog = ebpf.program(PROGRAM)?.try_into().ok()?;
        let answer = Array::try_from(ebpf.map(ANSWER)?).ok()?;
        Some(Self { prog, answer })
    }
}

/// What [`find_sockets`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Connections that now have their socket's address.
    pub found: usize,
    /// Connections the kernel no longer has (closed since the scan) or could not be looked up.
    pub not_found: usize,
    /// Network namespaces where the agent could not look sockets up (could not enter them, or
    /// the program did not run), with why; their connections keep no address.
    pub unreachable: Vec<(u32, String)>,
}

/// Looks up the socket of each connection in `connections` without one, and sets its `sk`
/// when found. Those in the calling thread's network namespace are looked up from it, without
/// a thread that moves.
pub fn find_sockets(prog: &Lookup<'_>, connections: &mut [Connection]) -> Found {
    // A namespace file's inode number is the namespace's.
    let own_netns = std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .and_then(|m| u32::try_from(m.ino()).ok());
    let mut by_netns: BTreeMap<u32, Vec<&mut Connection>> = BTreeMap::new();
    for c in connections.iter_mut().filter(|c| c.sk.is_none()) {
        by_netns.entry(c.netns).or_default().push(c);
    }
    let mut found = Found::default();
    for (netns, mut group) in by_netns {
        let outcome = if Some(netns) == own_netns {
            look_up(prog, &mut group)
        } else {
            std::thread::scope(|s| {
                let thread = std::thread::Builder::new()
                    .name("edgeward-lookup".to_owned())
                    .spawn_scoped(s, || {
                        enter_netns(netns, &group)?;
                        look_up(prog, &mut group)
                    });
                match thread {
                    Ok(t) => t
                        .join()
                        .unwrap_or_else(|_| Err("the lookup thread panicked".to_owned())),
                    Err(e) => Err(format!("cannot start a lookup thread: {e}")),
                }
            })
        };
        match outcome {
            Ok(n) => {
                found.found += n;
                found.not_found += group.len() - n;
            }
            Err(why) => {
                found.not_found += group.len();
                found.unreachable.push((netns, why));
            }
        }
    }
    found
}

/// Moves the calling thread into network namespace `netns`, through `/proc/PID/ns/net` of the
/// first process holding one of `group`'s sockets that is still in it.
fn enter_netns(netns: u32, group: &[&mut Connection]) -> Result<(), String> {
    let mut why = "no process holds its sockets".to_owned();
    let mut pids: Vec<u32> = group
        .iter()
        .filter_map(|c| Some(c.owner.as_ref()?.tgid))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        let path = format!("/proc/{pid}/ns/net");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                why = format!("{path}: {e}");
                continue;
            }
        };
        // The process may have exited and its pid gone to a process elsewhere: the namespace
        // file's inode number is the namespace's.
        if file.metadata().map(|m| m.ino()).ok() != Some(u64::from(netns)) {
            why = format!("{path} is no longer network namespace {netns}");
            continue;
        }
        // Moves this thread only; the thread ends after the lookups.
        return nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            format!("setns({path}): {e} (entering another network namespace needs CAP_SYS_ADMIN)")
        });
    }
    Err(why)
}

/// Looks up each connection of `group` in the calling thread's network namespace; returns how
/// many were found, or why the program could not run (then for none of them).
fn look_up(prog: &Lookup<'_>, group: &mut [&mut Connection]) -> Result<usize, String> {
    let mut found = 0;
    for c in group.iter_mut() {
        let sk = run(prog, &query(c))
            .map_err(|e| format!("BPF_PROG_TEST_RUN of {PROGRAM}: {}", error_chain(&e)))?;
        if let Some(sk) = sk {
            c.sk = Some(sk);
            found += 1;
        }
    }
    Ok(found)
}

/// The packet that would reach `c`'s socket: from its peer to its local address. A
/// connection between IPv4 addresses (in either table) is found by its IPv4 addresses.
fn query(c: &Connection) -> LookupQuery {
    let mut q = LookupQuery {
        sk: 0,
        family: AF_INET6,
        local_port: c.local.1,
        _pad: 0,
        tuple: [0; 40],
    };
    let (peer, local) = (c.peer.0, c.local.0);
    let ports = [c.peer.1.to_be_bytes(), c.local.1.to_be_bytes()].concat();
    match (v4(&peer), v4(&local)) {
        (Some(p), Some(l)) => {
            q.family = AF_INET;
            q.tuple[..4].copy_from_slice(&p);
            q.tuple[4..8].copy_from_slice(&l);
            q.tuple[8..12].copy_from_slice(&ports);
        }
        _ => {
            q.tuple[..16].copy_from_slice(&peer);
            q.tuple[16..32].copy_from_slice(&local);
            q.tuple[32..36].copy_from_slice(&ports);
        }
    }
    q
}

/// The IPv4 address in a v4-mapped IPv6 address.
fn v4(addr: &[u8; 16]) -> Option<[u8; 4]> {
    std::net::Ipv6Addr::from(*addr)
        .to_ipv4_mapped()
        .map(|a| a.octets())
}

/// Runs `conn_lookup` on one query; the socket's address when found.
fn run(lookup: &Lookup<'_>, q: &LookupQuery) -> Result<Option<u64>, ProgramError> {
    let mut packet = [0u8; lookup::PACKET_LEN];
    packet[lookup::AT..].copy_from_slice(&as_bytes(q));
    let result = lookup.prog.test_run(TestRunOptions {
        data_in: Some(&packet),
        ..TestRunOptions::new()
    })?;
    if result.return_value != lookup::FOUND {
        return Ok(None);
    }
    let sk = lookup.answer.get(&0, 0).map_err(ProgramError::from)?;
    Ok(Some(sk).filter(|&sk| sk != 0))
}

/// The query as the program reads it (`repr(C)`: no padding besides `_pad`).
fn as_bytes(q: &LookupQuery) -> [u8; std::mem::size_of::<LookupQuery>()] {
    let mut b = [0u8; std::mem::size_of::<LookupQuery>()];
    b[..8].copy_from_slice(&q.sk.to_ne_bytes());
    b[8..10].copy_from_slice(&q.family.to_ne_bytes());
    b[10..12].copy_from_slice(&q.local_port.to_ne_bytes());
    b[12..16].copy_from_slice(&q._pad.to_ne_bytes());
    b[16..].copy_from_slice(&q.tuple);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(local: ([u8; 16], u16), peer: ([u8; 16], u16)) -> Connection {
        Connection {
            sk: None,
            inode: 1,
            netns: 1,
            family: AF_INET6,
            local,
            peer,
            passive: false,
            connecting: false,
            owner: None,
        }
    }

    fn mapped(a: [u8; 4]) -> [u8; 16] {
        std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets()
    }

    #[test]
    fn an_ipv4_connection_is_looked_up_as_the_packet_from_its_peer() {
        let q = query(&connection(
            (mapped([10, 0, 0, 1]), 40000),
            (mapped([10, 0, 0, 2]), 443),
        ));
        assert_eq!((q.family, q.local_port), (AF_INET, 40000));
        assert_eq!(
            q.tuple[..12],
            [10, 0, 0, 2, 10, 0, 0, 1, 0x01, 0xbb, 0x9c, 0x40]
        );
        assert!(q.tuple[12..].iter().all(|&b| b == 0));
    }

    #[test]
    fn an_ipv6_connection_is_looked_up_by_its_ipv6_addresses() {
        let local = std::net::Ipv6Addr::LOCALHOST.octets();
        let peer = "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let q = query(&connection((local, 8080), (peer, 51000)));
        assert_eq!((q.family, q.local_port), (AF_INET6, 8080));
        assert_eq!(q.tuple[..16], peer);
        assert_eq!(q.tuple[16..32], local);
        assert_eq!(q.tuple[32..36], [0xc7, 0x38, 0x1f, 0x90]);
    }

    #[test]
    fn the_query_sits_where_the_program_reads_it() {
        assert_eq!(std::mem::size_of::<LookupQuery>(), 56);
        assert_eq!(lookup::PACKET_LEN, 72);
        let q = query(&connection(
            (mapped([1, 2, 3, 4]), 1),
            (mapped([5, 6, 7, 8]), 2),
        ));
        assert_eq!(as_bytes(&q)[8..10], AF_INET.to_ne_bytes());
    }
}
