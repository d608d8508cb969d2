//! Types shared by edgeward's eBPF programs and the agent that loads them.
//!
//! Everything here is `#[repr(C)]` plain data so that the kernel side can write it into BPF maps
//! and the ring buffer, and the user side can read it back byte for byte. With the `user`
//! feature the types implement [`aya::Pod`], which aya requires to read them out of maps and to
//! pass them as globals.
//!
//! The kernel programs keep no state per connection: each state change that matters writes a
//! record to the ring buffer ([`kind`]; the layouts [`OwnerRecord`], [`PortRecord`],
//! [`ListenRecord`], [`SocketRecord`], each starting with a [`Header`]), and the agent joins a
//! connection's records (its connect or accept, then its close) in a table of its own, into
//! connection events.
#![no_std]

/// Indexes into the per-CPU `COUNTERS` array map that every kernel program updates.
///
/// The agent sums each slot over all CPUs and exports it as a metric.
pub mod counter {
    /// `sock:inet_sock_set_state` events seen for TCP sockets (the floor program and the
    /// connection program both count here).
    pub const STATE_CHANGES: u32 = 0;
    /// Records written to the ring buffer.
    pub const EVENTS: u32 = 1;
    /// Records lost because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 2;
    /// Runs of the benchmark floor's counting program on the other tracepoint the probe may
    /// use (`tcp:tcp_retransmit_skb`).
    pub const FLOOR_OTHER: u32 = 3;
    /// Number of slots in the `COUNTERS` map.
    pub const LEN: u32 = 4;
}

/// Slots of the `WANTED` array map: records the agent switches on while it needs them.
pub mod wanted {
    /// Owner records at `-> FIN_WAIT1` / `-> LAST_ACK`: the agent holds passive opens whose
    /// listener it does not know.
    pub const OWNERS: u32 = 0;
    /// Open records at the end of every active handshake: the agent cannot run `conn_report`
    /// (no `BPF_PROG_TEST_RUN` of raw tracepoints), so it learns final addresses this way.
    pub const ESTABLISHED: u32 = 1;
    /// Number of slots.
    pub const LEN: u32 = 2;
}

/// What `conn_report` returns. The agent runs that program on demand (`BPF_PROG_TEST_RUN`)
/// to have a live connection's state, addresses and counters written as a
/// [`kind::REPORT`] record.
pub mod report {
    /// The record was written.
    pub const WRITTEN: u32 = 0;
    /// The socket could not be read (no socket given): nothing written.
    pub const GONE: u32 = 1;
    /// The ring buffer was full (counted as a loss).
    pub const RING_FULL: u32 = 2;
}

/// The socket lookup the agent runs with `conn_lookup` (`BPF_PROG_TEST_RUN` of a cgroup skb
/// program, never attached) for the connections it finds open at start where `/proc/net/tcp`
/// hides the sockets' kernel addresses: the program looks the connection up by its addresses
/// in the network namespace of the thread that runs it, and writes the socket's address into
/// the `LOOKUP_FOUND` map, for the agent to keep it like any other.
pub mod lookup {
    use super::LookupQuery;

    /// Where the [`LookupQuery`] starts in the test packet: after the 14-byte Ethernet header
    /// the kernel needs, at a multiple of 8.
    pub const AT: usize = 16;
    /// Where the program finds it: the kernel hands a cgroup skb program the packet from its
    /// network header on, past the Ethernet header.
    pub const AT_NETWORK: usize = AT - 14;
    /// Length of the test packet.
    pub const PACKET_LEN: usize = AT + core::mem::size_of::<LookupQuery>();
    /// Found: the `LOOKUP_FOUND` map holds the socket's address. (A cgroup skb program may
    /// return only 0 or 1.)
    pub const FOUND: u32 = 1;
    /// No connected socket with those addresses in this namespace, or a query that could not
    /// be read or names neither `AF_INET` nor `AF_INET6`.
    pub const NOT_FOUND: u32 = 0;
}

/// One connection to look up ([`lookup`]), seen as the packet that would reach it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LookupQuery {
    /// Unused (0): the answer goes to the `LOOKUP_FOUND` map, as a cgroup skb program may
    /// not write to its packet.
    pub sk: u64,
    /// `AF_INET` (an IPv4 tuple in the first 12 bytes of `tuple`) or `AF_INET6` (36 bytes).
    pub family: u16,
    /// The connection's local port (host order), checked against the socket found.
    pub local_port: u16,
    /// Padding.
    pub _pad: u32,
    /// `struct bpf_sock_tuple`: the peer's address, the local address, the peer's port, the
    /// local port (network order).
    pub tuple: [u8; 40],
}

/// Kind of a record ([`Header::kind`]) and of what the agent makes of records: the connection
/// events it reports (open, update, close), and the records the kernel writes for it to join
/// into them.
pub mod kind {
    /// An open. From the kernel only with `open_delay_ns` 0, for an active open at the end of
    /// its handshake (with its final addresses).
    pub const OPEN: u8 = 1;
    /// Periodic counters of an open connection (the agent makes these from reports).
    pub const UPDATE: u8 = 2;
    /// The socket reached `TCP_CLOSE`: final addresses, counters, `sk_err`, the state it
    /// left (`oldstate`); no start time (the agent has it).
    pub const CLOSE: u8 = 3;
    /// `connect()` (`-> SYN_SENT`, process context): the start time and the owner.
    pub const CONNECT: u8 = 4;
    /// A passive open's handshake completed (`SYN_RECV -> ESTABLISHED`): the start time, local
    /// port and network namespace (all the addresses when opens are reported at once); no
    /// owner (the agent knows the listener's).
    pub const ACCEPT: u8 = 5;
    /// The owner of a socket, written from its owner's context (`close()`/`shutdown()`, or
    /// `accept()` where the kernel allows the fexit hook) when the agent asked for owners.
    pub const OWNER: u8 = 6;
    /// `listen()`: the owner of a listening socket, its network namespace and port.
    pub const LISTEN: u8 = 7;
    /// A listening socket closed.
    pub const UNLISTEN: u8 = 8;
    /// One retransmitted segment (only where BTF lacks `tcp_sock.total_retrans`).
    pub const RETRANSMIT: u8 = 9;
    /// `conn_report`'s answer: the socket's current state (in `oldstate`), addresses and
    /// counters.
    pub const REPORT: u8 = 10;
}

/// Direction of a connection in a record ([`Header::direction`]).
pub mod direction {
    /// `connect()`.
    pub const ACTIVE: u8 = 1;
    /// `accept()`.
    pub const PASSIVE: u8 = 2;
}

/// `flags` bits of a record ([`Header::flags`]): which optional fields the kernel could fill
/// in.
pub mod flags {
    /// `bytes_sent`, `bytes_received`, `srtt_us`, `rttvar_us` and `retransmits` come from
    /// `tcp_sock` (BTF offsets were available).
    pub const TCP_COUNTERS: u16 = 1;
    /// `netns` is set.
    pub const NETNS: u16 = 1 << 1;
    /// `sk_err` is set.
    pub const SK_ERR: u16 = 1 << 2;
    /// pid, tgid, comm and cgroup id are those of the connection's owner.
    pub const PROCESS: u16 = 1 << 3;
    /// The addresses and ports are all set (a port record has its local port alone).
    pub const ADDRESSES: u16 = 1 << 4;
    /// Set by the agent, never by the programs: the connection was open before the probe
    /// started, so its start is when the agent found it.
    pub const BEFORE_PROBE: u16 = 1 << 15;
}

/// Unknown offset in [`Offsets`].
pub const NO_OFFSET: u32 = u32::MAX;

/// Kernel struct field offsets, read from the running kernel's BTF by the agent and handed to
/// the programs as the global `OFFSETS` before load. A field is [`NO_OFFSET`] when unknown; the
/// programs then leave the matching event fields out and clear the matching flag.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `tcp_sock.srtt_us` (u32, smoothed RTT << 3, microseconds).
    pub srtt_us: u32,
    /// `tcp_sock.mdev_us` (u32, RTT mean deviation << 2, microseconds).
    pub mdev_us: u32,
    /// `tcp_sock.bytes_acked` (u64).
    pub bytes_acked: u32,
    /// `tcp_sock.bytes_received` (u64).
    pub bytes_received: u32,
    /// `tcp_sock.total_retrans` (u32).
    pub total_retrans: u32,
    /// `sock.sk_err` (int).
    pub sk_err: u32,
    /// `sock.__sk_common.skc_net.net` (pointer to `struct net`); part of the head read when
    /// it lies within [`Offsets::sock_head_len`].
    pub sk_net: u32,
    /// `net.ns.inum` (u32).
    pub net_inum: u32,
    /// Wake the reader only once this many bytes wait in the ring buffer (0: on every
    /// record). The reader also drains the buffer on a short timer, so records below the
    /// threshold are late by at most that period, never lost.
    pub wakeup_bytes: u64,
    /// 0: an active open writes an [`kind::OPEN`] record when its handshake completes, so
    /// that the agent reports it at once. Otherwise the agent reports the open of a
    /// connection from its close record, or from a report once it has lived this long.
    pub open_delay_ns: u64,
    /// Start of the smallest 8-aligned span of `tcp_sock` that holds the five counters above
    /// (`srtt_us` … `total_retrans`), or [`NO_OFFSET`]: the programs then read each counter
    /// on its own. One read of the span costs less than five reads of a field each.
    pub counters_base: u32,
    /// Length of that span in bytes, at most [`COUNTERS_SPAN_MAX`] (0 when unused).
    pub counters_len: u32,
    /// `sock.sk_protocol` (u16).
    pub sk_protocol: u32,
    /// `sock.__sk_common.skc_family` (u16).
    pub skc_family: u32,
    /// `sock.__sk_common.skc_dport` (be16).
    pub skc_dport: u32,
    /// `sock.__sk_common.skc_num` (u16, host order).
    pub skc_num: u32,
    /// `sock.__sk_common.skc_daddr` (be32).
    pub skc_daddr: u32,
    /// `sock.__sk_common.skc_rcv_saddr` (be32).
    pub skc_rcv_saddr: u32,
    /// `sock.__sk_common.skc_v6_daddr` (16 bytes).
    pub skc_v6_daddr: u32,
    /// `sock.__sk_common.skc_v6_rcv_saddr` (16 bytes).
    pub skc_v6_rcv_saddr: u32,
    /// `sock.__sk_common.skc_state` (u8).
    pub skc_state: u32,
    /// `inet_sock.inet_sport` (be16): the local port of a closing socket, whose `skc_num` the
    /// kernel has already released when it held an automatically chosen port.
    pub inet_sport: u32,
    /// Bytes from the start of `sock` that hold all the `skc_*` fields above (and `sk_err`
    /// and `sk_protocol` when they fit too), at most [`SOCK_HEAD_MAX`]; 0 when an `skc_*`
    /// field is unknown or lies further in. The raw-tracepoint programs read this head in one
    /// go and need it set; a field outside it they read on its own.
    pub sock_head_len: u32,
    /// `task_struct.tgid` (pid_t): for the `held_sockets` iterator, as are the three below.
    pub task_tgid: u32,
    /// `file.f_inode` (pointer to `struct inode`).
    pub file_inode: u32,
    /// `inode.i_ino` (unsigned long).
    pub inode_ino: u32,
    /// `socket.sk` (pointer to `struct sock`).
    pub socket_sk: u32,
    /// `task_struct.cgroups` (pointer to `struct css_set`): with the three below, the cgroup
    /// v2 id of a socket's holder in the `held_sockets` iterator (optional: without them the
    /// agent reads /proc/PID/cgroup, which a cgroup namespace of its own makes relative).
    pub task_cgroups: u32,
    /// `css_set.dfl_cgrp` (pointer to `struct cgroup`).
    pub css_set_dfl_cgrp: u32,
    /// `cgroup.kn` (pointer to `struct kernfs_node`).
    pub cgroup_kn: u32,
    /// `kernfs_node.id` (u64: the cgroup id, as `bpf_get_current_cgroup_id` gives it).
    pub kernfs_node_id: u32,
    /// Padding.
    pub _pad: u32,
}

/// The widest `tcp_sock` span the programs read in one go (their per-CPU scratch buffer).
pub const COUNTERS_SPAN_MAX: usize = 1024;

/// The longest head of `sock` the programs read in one go: ten cache lines. A longer head
/// (out to `inet_sport`, 816 bytes here) cost more to copy than the read it saved.
pub const SOCK_HEAD_MAX: usize = 640;

impl Offsets {
    /// Nothing known: the programs report what tracepoint arguments alone give.
    pub const UNKNOWN: Self = Self {
        srtt_us: NO_OFFSET,
        mdev_us: NO_OFFSET,
        bytes_acked: NO_OFFSET,
        bytes_received: NO_OFFSET,
        total_retrans: NO_OFFSET,
        sk_err: NO_OFFSET,
        sk_net: NO_OFFSET,
        net_inum: NO_OFFSET,
        wakeup_bytes: 0,
        open_delay_ns: 0,
        counters_base: NO_OFFSET,
        counters_len: 0,
        sk_protocol: NO_OFFSET,
        skc_family: NO_OFFSET,
        skc_dport: NO_OFFSET,
        skc_num: NO_OFFSET,
        skc_daddr: NO_OFFSET,
        skc_rcv_saddr: NO_OFFSET,
        skc_v6_daddr: NO_OFFSET,
        skc_v6_rcv_saddr: NO_OFFSET,
        skc_state: NO_OFFSET,
        inet_sport: NO_OFFSET,
        sock_head_len: 0,
        task_tgid: NO_OFFSET,
        file_inode: NO_OFFSET,
        inode_ino: NO_OFFSET,
        socket_sk: NO_OFFSET,
        task_cgroups: NO_OFFSET,
        css_set_dfl_cgrp: NO_OFFSET,
        cgroup_kn: NO_OFFSET,
        kernfs_node_id: NO_OFFSET,
        _pad: 0,
    };

    /// Sets [`Offsets::sock_head_len`] from the `skc_*` offsets, extended over `sk_err` and
    /// `sk_protocol` when the whole fits [`SOCK_HEAD_MAX`]: every record about a socket
    /// checks its protocol, and a close reads its error, so one read of 534 bytes (on 6.18)
    /// replaces three reads. The programs take `sk_net` from the head too when it lies within
    /// (it does on the kernels seen), else read it on its own.
    pub fn set_sock_head(&mut self) {
        let fields = [
            (self.skc_family, 2),
            (self.skc_dport, 2),
            (self.skc_num, 2),
            (self.skc_daddr, 4),
            (self.skc_rcv_saddr, 4),
            (self.skc_v6_daddr, 16),
            (self.skc_v6_rcv_saddr, 16),
            (self.skc_state, 1),
        ];
        self.sock_head_len = 0;
        let Some((_, end)) = extent(&fields) else {
            return;
        };
        // The programs copy the IPv6 addresses as two 8-byte words.
        let aligned =
            self.skc_v6_daddr.is_multiple_of(8) && self.skc_v6_rcv_saddr.is_multiple_of(8);
        if !aligned || end as usize > SOCK_HEAD_MAX {
            return;
        }
        self.sock_head_len = end;
        if let Some((_, extended)) = extent(&[(self.sk_err, 4), (self.sk_protocol, 2)])
            && extended as usize <= SOCK_HEAD_MAX
        {
            self.sock_head_len = end.max(extended);
        }
    }

    /// Whether the raw-tracepoint programs can run: they read the protocol, addresses and
    /// ports from the socket rather than from a tracepoint record. Call after
    /// [`Offsets::set_sock_head`].
    pub const fn has_sock_addresses(&self) -> bool {
        self.sk_protocol != NO_OFFSET && self.sock_head_len != 0
    }

    /// Whether the `held_sockets` iterator can run: it needs the holder's tgid, the socket
    /// file's inode, the socket, its protocol and family, and its network namespace.
    pub const fn has_held_sockets(&self) -> bool {
        self.task_tgid != NO_OFFSET
            && self.file_inode != NO_OFFSET
            && self.inode_ino != NO_OFFSET
            && self.socket_sk != NO_OFFSET
            && self.sk_protocol != NO_OFFSET
            && self.skc_family != NO_OFFSET
            && self.sk_net != NO_OFFSET
            && self.net_inum != NO_OFFSET
    }

    /// Sets [`Offsets::counters_base`] and [`Offsets::counters_len`] from the counter
    /// offsets: the span from the first counter (rounded down to 8) to the end of the last,
    /// when every counter is known and the span fits [`COUNTERS_SPAN_MAX`].
    pub fn set_counter_span(&mut self) {
        let fields = [
            (self.srtt_us, 4),
            (self.mdev_us, 4),
            (self.bytes_acked, 8),
            (self.bytes_received, 8),
            (self.total_retrans, 4),
        ];
        self.counters_base = NO_OFFSET;
        self.counters_len = 0;
        let Some((start, end)) = extent(&fields) else {
            return;
        };
        let start = start & !7;
        if end - start <= COUNTERS_SPAN_MAX as u32 {
            self.counters_base = start;
            self.counters_len = end - start;
        }
    }
}

/// The first and one-past-the-last byte of `(offset, size)` fields; `None` when an offset is
/// unknown.
fn extent(fields: &[(u32, u32)]) -> Option<(u32, u32)> {
    let mut span = (u32::MAX, 0);
    for &(offset, size) in fields {
        if offset == NO_OFFSET {
            return None;
        }
        span = (span.0.min(offset), span.1.max(offset.saturating_add(size)));
    }
    Some(span)
}

/// What every record in the `EVENTS` ring buffer starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Kernel address of the socket.
    pub sk: u64,
    /// `bpf_ktime_get_ns` when the record was written: the start of a connect or accept.
    pub ts_ns: u64,
    /// [`kind`].
    pub kind: u8,
    /// [`direction`] (connect, accept, open), 0 otherwise.
    pub direction: u8,
    /// The state a close left; the current state in a report (255 when unknown).
    pub oldstate: u8,
    /// Padding.
    pub _pad: u8,
    /// [`flags`] bits.
    pub flags: u16,
    /// `AF_INET` or `AF_INET6` (0 when not read).
    pub family: u16,
}

/// Connect and owner records: the process that owns the socket (the current one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerRecord {
    /// Kind, socket, time.
    pub head: Header,
    /// Thread id.
    pub pid: u32,
    /// Thread group id.
    pub tgid: u32,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// `comm`.
    pub comm: [u8; 16],
}

/// Accept (with an open delay) and unlisten records: a socket's local port and network
/// namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRecord {
    /// Kind, socket, time.
    pub head: Header,
    /// Network namespace inode number ([`flags::NETNS`]).
    pub netns: u32,
    /// Local port (host order).
    pub lport: u16,
    /// Padding.
    pub _pad: u16,
}

/// Listen records: the owner of a listening port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenRecord {
    /// The owner (kind `LISTEN`).
    pub owner: OwnerRecord,
    /// Network namespace inode number ([`flags::NETNS`]).
    pub netns: u32,
    /// Local port (host order).
    pub lport: u16,
    /// Padding.
    pub _pad: u16,
}

/// Close, report and open records (and accept records without an open delay): the socket's
/// addresses and, for close and report, its counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRecord {
    /// Kind, socket, time, family.
    pub head: Header,
    /// Network namespace inode number ([`flags::NETNS`]).
    pub netns: u32,
    /// Local port (host order).
    pub lport: u16,
    /// Peer port (host order).
    pub rport: u16,
    /// Local address (IPv4 as v4-mapped IPv6).
    pub saddr: [u8; 16],
    /// Peer address.
    pub daddr: [u8; 16],
    /// `tcp_sock.bytes_acked`.
    pub bytes_acked: u64,
    /// `tcp_sock.bytes_received`.
    pub bytes_received: u64,
    /// `tcp_sock.srtt_us >> 3`.
    pub srtt_us: u32,
    /// `tcp_sock.mdev_us >> 2`.
    pub rttvar_us: u32,
    /// `tcp_sock.total_retrans`.
    pub retransmits: u32,
    /// `sock.sk_err` (close records, [`flags::SK_ERR`]).
    pub sk_err: i32,
}

/// One TCP socket a process holds (an open file of it), as the `held_sockets` iterator writes
/// it: what `/proc/PID/fd` and `/proc/PID/ns/net` would say, read without the `ptrace` access
/// those take.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldSocket {
    /// Kernel address of the socket, as in [`Header::sk`].
    pub sk: u64,
    /// Inode number of the socket's file (`socket:[N]`).
    pub inode: u64,
    /// The process (thread group) holding it.
    pub tgid: u32,
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    /// The holder's cgroup v2 id; 0 when the kernel's BTF does not give the fields it is read
    /// through.
    pub cgroup_id: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data of integers and byte arrays, no padding left implicit.
    unsafe impl aya::Pod for super::Offsets {}
}
