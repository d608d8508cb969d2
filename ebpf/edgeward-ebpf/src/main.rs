//! edgeward's kernel programs.
//!
//! Built for `bpfel-unknown-none` by the agent's build script (aya-build) and embedded in the
//! agent binary. Programs attach to stable kernel tracepoints (many edge kernels are built
//! without kprobes): `sock:inet_sock_set_state` for the life cycle of every connection, and
//! `tcp:tcp_retransmit_skb` only where BTF does not give `tcp_sock.total_retrans`. Nothing
//! runs per send or receive: the cost is per state change, whatever a connection carries.
//!
//! Each tracepoint program comes in two forms with the same logic: a raw tracepoint
//! (`*_raw`, given the `TP_PROTO` arguments: the socket pointer and the states), which the
//! agent uses when the kernel's BTF gives the socket's address fields, and a classic
//! tracepoint (given the formatted record), for kernels without BTF. A raw tracepoint costs
//! the kernel less per run: no record is formatted into a per-CPU buffer before the program
//! runs, and the probe runs about ten times per short connection. In exchange the raw
//! programs read what they need from the socket, so they read as little as they can: the
//! protocol only where an entry is created (entries exist only for TCP sockets), the
//! addresses once per connection end, as one span.
//!
//! Life of a connection in the `CONNS` map (keyed by the socket's kernel address):
//! - `SYN_SENT` (in `connect()`, process context): entry created, process attributed.
//! - `SYN_SENT -> ESTABLISHED` (softirq): addresses read; open record written if
//!   `open_delay_ns` is 0.
//! - `SYN_RECV -> ESTABLISHED` (softirq, no process): entry created, attributed to the
//!   process listening on its port (`LISTENERS`: recorded at `CLOSE -> LISTEN`, which happens
//!   in `listen()`, and seeded by the agent with the listeners older than the probe); open
//!   record written if `open_delay_ns` is 0.
//! - A passive open whose listener is unknown is attributed to the process that closes it:
//!   `ESTABLISHED -> FIN_WAIT1` and `CLOSE_WAIT -> LAST_ACK` happen only in
//!   `close()`/`shutdown()`, and so does an abort straight to `CLOSE` that the kernel gives no
//!   error for (a reset it receives sets `sk_err` first). Where the kernel allows tracing
//!   programs, fexit on `inet_csk_accept` attributes it to the accepting process.
//! - While it lives, the agent's sweep of `CONNS` reports its open once it is older than
//!   `open_delay_ns`, and asks `conn_report` (run on demand, never attached) for an update
//!   record with its counters every update interval.
//! - `-> CLOSE`: close record with the final counters, entry removed. A connection that
//!   closes within `open_delay_ns` has no open record: the agent reports its open from the
//!   close record (one record per end instead of two).
//!
//! Kernel struct field offsets come from the running kernel's BTF (global `OFFSETS`).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{self, bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
    macros::{fexit, map, raw_tracepoint, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{FExitContext, RawTracePointContext, TracePointContext},
};
use edgeward_common::{
    COUNTERS_SPAN_MAX, ConnInfo, NO_OFFSET, Offsets, Owner, RawEvent, SOCK_HEAD_MAX, counter,
    direction, flags, kind, listener_key, report,
};

/// Per-CPU event counters, indexed by [`edgeward_common::counter`].
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Connections in flight. The agent sets the size at load (`probe.max_connections`).
#[map]
static CONNS: LruHashMap<u64, ConnInfo> = LruHashMap::with_max_entries(65_536, 0);

/// Owners of listening sockets by network namespace and port ([`listener_key`]): recorded at
/// `listen()` (the owner's context) and seeded by the agent with the listeners that were open
/// before it started. Passive opens take their owner from here.
#[map]
static LISTENERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(8_192, 0);

/// Events to the agent. The agent sets the size at load (`probe.ring_buffer_bytes`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Scratch space for one read of the `tcp_sock` span that holds the counters. One slot per
/// CPU is enough: the kernel does not nest tracing programs on a CPU (it skips the inner one).
#[map]
static SCRATCH: PerCpuArray<[u8; COUNTERS_SPAN_MAX]> = PerCpuArray::with_max_entries(1, 0);

/// Field offsets from the running kernel's BTF, set by the agent before load.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::UNKNOWN;

const IPPROTO_TCP: u16 = 6;
const AF_INET6: u16 = 10;

/// `bpf_ringbuf_submit` / `bpf_ringbuf_query` flags (uapi/linux/bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;
const TCP_LISTEN: i32 = 10;

/// Field offsets of the `sock:inet_sock_set_state` record, from
/// /sys/kernel/tracing/events/sock/inet_sock_set_state/format. Tracepoint layouts are ABI.
mod set_state {
    pub const SKADDR: usize = 8;
    pub const OLDSTATE: usize = 16;
    pub const NEWSTATE: usize = 20;
    pub const SPORT: usize = 24;
    pub const DPORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    pub const SADDR_V6: usize = 40;
    pub const DADDR_V6: usize = 56;
}

/// `TP_PROTO` argument positions of `inet_sock_set_state(sk, oldstate, newstate)`;
/// `tcp_retransmit_skb` has the socket first too.
mod raw_arg {
    pub const SK: usize = 0;
    pub const OLDSTATE: usize = 1;
    pub const NEWSTATE: usize = 2;
}

/// `tcp:tcp_retransmit_skb`: `skaddr`.
const RETRANSMIT_SKADDR: usize = 16;

#[inline(always)]
fn count(slot: u32) {
    if let Some(ptr) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from the map lookup for this CPU and is valid for the
        // duration of the program; per-CPU slots are never written concurrently.
        unsafe { *ptr += 1 };
    }
}

/// Loads a field of the tracepoint record straight from the context (no helper call; the
/// verifier checks that the offset is inside the record and aligned to the size).
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: tracepoint programs may read their context directly; every offset used is a
    // field of the record as given by its format file, aligned to the field's size.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const T) }
}

/// Copies a 16-byte field as two 8-byte moves. A plain array assignment compiles to a call
/// into a byte-by-byte `memmove` on BPF (about a hundred instructions per copy).
///
/// # Safety
/// Both pointers must be valid and 8-byte aligned: every 16-byte field of `ConnInfo` and
/// `RawEvent` sits at a multiple of 8 in an 8-aligned struct.
#[inline(always)]
unsafe fn copy16(dst: *mut [u8; 16], src: *const [u8; 16]) {
    let (d, s) = (dst as *mut u64, src as *const u64);
    // SAFETY: the caller guarantees validity and alignment.
    unsafe {
        *d = *s;
        *d.add(1) = *s.add(1);
    }
}

/// A 16-byte address field of the record, stored as two aligned 8-byte moves.
#[inline(always)]
fn field_addr(ctx: &TracePointContext, offset: usize, dst: &mut [u8; 16]) {
    let d = dst as *mut [u8; 16] as *mut u64;
    // SAFETY: `dst` is a field of an 8-aligned `ConnInfo` at a multiple of 8 (see `copy16`).
    unsafe {
        *d = field(ctx, offset);
        *d.add(1) = field(ctx, offset + 8);
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn offsets() -> Offsets {
    // SAFETY: OFFSETS lives in read-only global data that the agent fills in before load;
    // the volatile read keeps the compiler from folding in the default value.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Reads `len` bytes of the socket from offset `base` into this CPU's scratch slot, for
/// fields to be picked with [`span_ptr`]. `None` when the span is not set (`base` unknown or
/// `len` 0) or cannot be read.
#[inline(always)]
fn read_span(sk: u64, base: u32, len: u32) -> Option<*const u8> {
    if base == NO_OFFSET || len == 0 || len > COUNTERS_SPAN_MAX as u32 || sk == 0 {
        return None;
    }
    let buf = SCRATCH.get_ptr_mut(0)? as *mut u8;
    // SAFETY: `buf` is this CPU's scratch slot and `len` bytes fit in it; the helper checks
    // the source address and fails cleanly on a bad one.
    let ret = unsafe {
        generated::bpf_probe_read_kernel(buf as *mut _, len, (sk + base as u64) as *const _)
    };
    (ret == 0).then_some(buf as *const u8)
}

/// Where the `size`-byte field at kernel offset `offset` lies in a span read from `base` by
/// [`read_span`], if inside the first `max` bytes of the slot.
#[inline(always)]
fn span_ptr(buf: *const u8, base: u32, offset: u32, size: usize, max: usize) -> Option<*const u8> {
    let rel = offset.wrapping_sub(base) as usize;
    // SAFETY: `rel + size <= max`, inside the scratch slot (checked first).
    (rel <= max - size).then(|| unsafe { buf.add(rel) })
}

/// The field at kernel offset `offset` of a span read from `base`.
///
/// # Safety
/// `buf` comes from [`read_span`], and the field is naturally aligned in the kernel struct
/// with `base` a multiple of its alignment, so the read is aligned.
#[inline(always)]
unsafe fn span_field<T: Copy>(buf: *const u8, base: u32, offset: u32, max: usize) -> Option<T> {
    let p = span_ptr(buf, base, offset, core::mem::size_of::<T>(), max)?;
    // SAFETY: inside the slot (`span_ptr`) and aligned (the caller).
    Some(unsafe { core::ptr::read(p as *const T) })
}

/// `(srtt_us, mdev_us, bytes_acked, bytes_received, total_retrans)` from one read of the
/// `tcp_sock` span that holds them (see `Offsets::counters_base`); `None` when the span is
/// not set or cannot be read (the caller then reads each field on its own).
#[inline(always)]
fn counters_from_span(sk: u64, off: &Offsets) -> Option<(u32, u32, u64, u64, u32)> {
    let base = off.counters_base;
    let buf = read_span(sk, base, off.counters_len)?;
    const MAX: usize = COUNTERS_SPAN_MAX;
    // SAFETY: the span starts 8-aligned (`Offsets::set_counter_span`).
    unsafe {
        Some((
            span_field(buf, base, off.srtt_us, MAX)?,
            span_field(buf, base, off.mdev_us, MAX)?,
            span_field(buf, base, off.bytes_acked, MAX)?,
            span_field(buf, base, off.bytes_received, MAX)?,
            span_field(buf, base, off.total_retrans, MAX)?,
        ))
    }
}

/// Reads the field at `base + offset` into `out`; false (and `out` untouched, or zeroed by
/// the helper) when the offset is unknown or the read fails.
#[inline(always)]
fn read_into<T: Copy>(base: u64, offset: u32, out: &mut T) -> bool {
    if offset == NO_OFFSET || base == 0 {
        return false;
    }
    // SAFETY: `out` is a writable `T`; the helper checks the source address and zeroes `out`
    // when the read fails.
    unsafe {
        generated::bpf_probe_read_kernel(
            out as *mut T as *mut _,
            core::mem::size_of::<T>() as u32,
            (base + offset as u64) as *const _,
        ) == 0
    }
}

/// Records the current process as the connection's owner (process context only).
#[inline(always)]
fn attribute(info: &mut ConnInfo) {
    let id = bpf_get_current_pid_tgid();
    info.pid = id as u32;
    info.tgid = (id >> 32) as u32;
    // Straight into the entry: the helper's safe wrapper returns the name by value, which
    // costs a byte-wise copy.
    // SAFETY: `comm` is a writable 16-byte buffer; on failure the helper zeroes it.
    unsafe { bpf_get_current_comm(info.comm.as_mut_ptr() as *mut _, 16) };
    // SAFETY: a helper without pointer arguments.
    info.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    info.attributed = 1;
}

/// The current process as an [`Owner`] of the listening socket `sk`.
#[inline(always)]
fn current_owner(sk: u64) -> Owner {
    let mut info = zeroed_conn();
    attribute(&mut info);
    Owner {
        cgroup_id: info.cgroup_id,
        pid: info.pid,
        tgid: info.tgid,
        comm: info.comm,
        sk,
    }
}

/// Takes the owner of the connection from the listener on its port, if known.
#[inline(always)]
fn attribute_to_listener(info: &mut ConnInfo) {
    if info.netns == 0 {
        return;
    }
    let Some(owner) = LISTENERS.get_ptr(&listener_key(info.netns, info.lport)) else {
        return;
    };
    // SAFETY: a map value pointer from the lookup; `comm` is 8-aligned in both structs (see
    // `copy16`).
    unsafe {
        info.cgroup_id = (*owner).cgroup_id;
        info.pid = (*owner).pid;
        info.tgid = (*owner).tgid;
        copy16(&mut info.comm, &(*owner).comm);
    }
    info.attributed = 1;
}

/// `listen()` (process context): the current process owns the listener.
#[inline(always)]
fn on_listen<S: Source>(source: &S, sk: u64) {
    let netns = netns_of(sk);
    let port = source.local_port();
    if netns == 0 || port == 0 {
        // Without BTF the namespace is unknown, and a port of 0 is bound only after the state
        // change: the owner is then learnt when it closes its connections.
        return;
    }
    let _ = LISTENERS.insert(&listener_key(netns, port), &current_owner(sk), 0);
}

/// A listener closed: forget it unless another listener on the same port replaced it (the
/// agent's own entries, found in /proc, have no socket address and go too).
#[inline(always)]
fn on_listener_close<S: Source>(source: &S, sk: u64) {
    let key = listener_key(netns_of(sk), source.local_port());
    if let Some(owner) = LISTENERS.get_ptr(&key) {
        // SAFETY: a map value pointer from the lookup.
        let owner_sk = unsafe { (*owner).sk };
        if owner_sk == sk || owner_sk == 0 {
            let _ = LISTENERS.remove(&key);
        }
    }
}

/// `sock.sk_err`, when its offset is known.
#[derive(Clone, Copy)]
struct SkErr {
    value: i32,
    known: bool,
}

impl SkErr {
    const UNKNOWN: Self = Self {
        value: 0,
        known: false,
    };

    #[inline(always)]
    fn read(sk: u64) -> Self {
        let mut value = 0i32;
        let known = read_into(sk, offsets().sk_err, &mut value);
        Self { value, known }
    }
}

/// Writes one record for `sk` to the ring buffer; counts it or its loss. `sk_err` goes into
/// close records. An update is not written once the connection's close has begun
/// (`ConnInfo::closed`): the close record is ahead of it in the ring buffer.
#[inline(always)]
fn emit(sk: u64, info: &ConnInfo, event_kind: u8, oldstate: i32, now: u64, sk_err: SkErr) -> u32 {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count(counter::RINGBUF_FULL);
        return report::RING_FULL;
    };
    // The close path sets `closed` before it reserves its record, and reserving takes the
    // ring buffer's lock: a close that reserved first is visible here.
    // SAFETY: a plain read of a field of a live map value.
    if event_kind == kind::UPDATE && unsafe { core::ptr::read_volatile(&info.closed) } != 0 {
        entry.discard(BPF_RB_NO_WAKEUP);
        return report::GONE;
    }
    let off = offsets();
    let mut event_flags = 0u16;
    // Open events carry no counters (nothing has been exchanged yet): no reads on the
    // hottest path of short connections. Every value is a defined zero until read: with
    // `Option`s, LLVM may compute on the payload of a `None` (whatever a register held, e.g.
    // the ring buffer pointer) before selecting it away, which the verifier rejects.
    let (mut srtt, mut mdev, mut acked, mut received, mut retrans) = (0u32, 0u32, 0u64, 0u64, 0u32);
    let mut retrans_known = false;
    if event_kind != kind::OPEN {
        if let Some(c) = counters_from_span(sk, &off) {
            (srtt, mdev, acked, received, retrans) = c;
            retrans_known = true;
            event_flags |= flags::TCP_COUNTERS;
        } else {
            let have_srtt = read_into(sk, off.srtt_us, &mut srtt);
            read_into(sk, off.mdev_us, &mut mdev);
            let have_acked = read_into(sk, off.bytes_acked, &mut acked);
            let have_received = read_into(sk, off.bytes_received, &mut received);
            retrans_known = read_into(sk, off.total_retrans, &mut retrans);
            if have_srtt && have_acked && have_received && retrans_known {
                event_flags |= flags::TCP_COUNTERS;
            }
        }
    }
    if event_kind == kind::CLOSE && sk_err.known {
        event_flags |= flags::SK_ERR;
    }
    if info.netns != 0 {
        event_flags |= flags::NETNS;
    }
    if info.attributed != 0 {
        event_flags |= flags::PROCESS;
    }
    if event_kind == kind::CLOSE && info.opened != 0 {
        event_flags |= flags::OPEN_REPORTED;
    }
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at a reserved, exclusively owned ring buffer record of the right
    // size; every field is written before submit.
    unsafe {
        (*e).sk = sk;
        (*e).start_ns = info.start_ns;
        (*e).ts_ns = now;
        (*e).cgroup_id = info.cgroup_id;
        // Volatile: two zero stores would otherwise merge into a call to a byte-wise memset.
        core::ptr::write_volatile(&mut (*e).bytes_acked, acked);
        core::ptr::write_volatile(&mut (*e).bytes_received, received);
        (*e).pid = info.pid;
        (*e).tgid = info.tgid;
        (*e).netns = info.netns;
        (*e).srtt_us = srtt >> 3;
        (*e).rttvar_us = mdev >> 2;
        (*e).retransmits = if retrans_known {
            retrans
        } else {
            info.retransmits
        };
        (*e).sk_err = if event_kind == kind::CLOSE {
            sk_err.value
        } else {
            0
        };
        (*e).lport = info.lport;
        (*e).rport = info.rport;
        (*e).family = info.family;
        (*e).flags = event_flags;
        (*e).kind = event_kind;
        (*e).direction = info.direction;
        (*e).oldstate = oldstate as u8;
        (*e)._pad = 0;
        copy16(&mut (*e).saddr, &info.saddr);
        copy16(&mut (*e).daddr, &info.daddr);
        copy16(&mut (*e).comm, &info.comm);
    }
    // Waking the reader costs an irq_work in the kernel and a wakeup in the agent per record;
    // at tens of thousands of connections a second that dominates. Wake it only when enough
    // has piled up; it drains on a timer otherwise.
    let wakeup = if off.wakeup_bytes == 0 || EVENTS.query(BPF_RB_AVAIL_DATA) >= off.wakeup_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wakeup);
    count(counter::EVENTS);
    report::WRITTEN
}

/// Where a program finds a connection's addresses and ports, and whether it is TCP.
trait Source {
    /// Fills in family, ports and addresses (IPv4 as v4-mapped IPv6, as the tracepoint
    /// record has them).
    fn read_addresses(&self, info: &mut ConnInfo);
    /// The local port alone (0 when it cannot be read).
    fn local_port(&self) -> u16;
    /// Whether the socket is a TCP socket (asked only before an entry is created).
    fn is_tcp(&self) -> bool;
}

/// The `inet_sock_set_state` record of a classic tracepoint (checked to be TCP already).
struct Record<'a>(&'a TracePointContext);

impl Source for Record<'_> {
    #[inline(always)]
    fn read_addresses(&self, info: &mut ConnInfo) {
        let ctx = self.0;
        info.lport = field(ctx, set_state::SPORT);
        info.rport = field(ctx, set_state::DPORT);
        info.family = field(ctx, set_state::FAMILY);
        field_addr(ctx, set_state::SADDR_V6, &mut info.saddr);
        field_addr(ctx, set_state::DADDR_V6, &mut info.daddr);
    }

    #[inline(always)]
    fn local_port(&self) -> u16 {
        field(self.0, set_state::SPORT)
    }

    #[inline(always)]
    fn is_tcp(&self) -> bool {
        true
    }
}

/// The socket itself (raw tracepoints): `sock_common` is read in one go into the per-CPU
/// scratch slot and the fields picked at their BTF offsets.
struct Sock(u64);

impl Source for Sock {
    #[inline(always)]
    fn read_addresses(&self, info: &mut ConnInfo) {
        let off = offsets();
        // The head of the socket, from offset 0: `sock_common`.
        let Some(buf) = read_span(self.0, 0, off.sock_head_len) else {
            return;
        };
        const MAX: usize = SOCK_HEAD_MAX;
        // SAFETY: the fields are naturally aligned in the kernel struct and the span starts
        // at the socket itself; the agent only sets `sock_head_len` when the IPv6 addresses
        // are 8-aligned, as `copy16` needs.
        unsafe {
            let Some(family) = span_field::<u16>(buf, 0, off.skc_family, MAX) else {
                return;
            };
            info.family = family;
            if let Some(port) = span_field::<u16>(buf, 0, off.skc_dport, MAX) {
                info.rport = u16::from_be(port);
            }
            if let Some(port) = span_field(buf, 0, off.skc_num, MAX) {
                info.lport = port;
            }
            if family == AF_INET6 {
                if let Some(p) = span_ptr(buf, 0, off.skc_v6_rcv_saddr, 16, MAX) {
                    copy16(&mut info.saddr, p as *const [u8; 16]);
                }
                if let Some(p) = span_ptr(buf, 0, off.skc_v6_daddr, 16, MAX) {
                    copy16(&mut info.daddr, p as *const [u8; 16]);
                }
            } else {
                if let Some(addr) = span_field(buf, 0, off.skc_rcv_saddr, MAX) {
                    v4_mapped(addr, &mut info.saddr);
                }
                if let Some(addr) = span_field(buf, 0, off.skc_daddr, MAX) {
                    v4_mapped(addr, &mut info.daddr);
                }
            }
        }
    }

    #[inline(always)]
    fn local_port(&self) -> u16 {
        let mut port = 0u16;
        read_into(self.0, offsets().skc_num, &mut port);
        port
    }

    #[inline(always)]
    fn is_tcp(&self) -> bool {
        let mut protocol = 0u16;
        read_into(self.0, offsets().sk_protocol, &mut protocol) && protocol == IPPROTO_TCP
    }
}

/// `::ffff:a.b.c.d` from an IPv4 address as it lies in memory (network order).
#[inline(always)]
fn v4_mapped(addr: u32, dst: &mut [u8; 16]) {
    let d = dst as *mut [u8; 16] as *mut u64;
    // SAFETY: `dst` is a field of an 8-aligned `ConnInfo` at a multiple of 8 (see `copy16`).
    // Little-endian: bytes 8..12 are 00 00 ff ff, bytes 12..16 the address.
    unsafe {
        *d = 0;
        *d.add(1) = 0xffff_0000 | (addr as u64) << 32;
    }
}

/// The inode number of the socket's network namespace (0 when the offsets are unknown).
#[inline(always)]
fn netns_of(sk: u64) -> u32 {
    let off = offsets();
    let (mut net, mut inum) = (0u64, 0u32);
    if read_into(sk, off.sk_net, &mut net) {
        read_into(net, off.net_inum, &mut inum);
    }
    inum
}

/// An all-zero `ConnInfo`, written as volatile 8-byte stores. Zero initialisation that the
/// compiler may shorten around later field writes ends up as calls into a byte-wise `memset`
/// for the odd-sized gaps; volatile stores are neither merged nor shortened.
#[inline(always)]
fn zeroed_conn() -> ConnInfo {
    let mut info = core::mem::MaybeUninit::<ConnInfo>::uninit();
    let words = info.as_mut_ptr() as *mut u64;
    let mut i = 0;
    while i < core::mem::size_of::<ConnInfo>() / 8 {
        // SAFETY: `ConnInfo` is 8-aligned, a multiple of 8 bytes long, and plain data
        // (integers and byte arrays), so all zeroes is a valid value.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte was written above.
    unsafe { info.assume_init() }
}

/// A new entry for `sk`, network namespace read from the socket (once here rather than in
/// every record). Addresses are the caller's: an active open has its local port only once
/// the handshake completes or fails.
#[inline(always)]
fn new_conn(sk: u64, dir: u8, now: u64) -> ConnInfo {
    let mut info = zeroed_conn();
    info.start_ns = now;
    info.last_emit_ns = now;
    info.direction = dir;
    info.netns = netns_of(sk);
    info
}

/// Counts TCP state changes and nothing else: the floor of any design on this tracepoint,
/// used by the benchmark as the "minimal program" leg.
#[tracepoint]
pub fn count_state_changes(ctx: TracePointContext) -> u32 {
    let protocol: u16 = field(&ctx, set_state::PROTOCOL);
    if protocol == IPPROTO_TCP {
        count(counter::STATE_CHANGES);
    }
    0
}

/// Counts every run and nothing else: the benchmark floor's program on the other tracepoint
/// the probe may attach to (`tcp_retransmit_skb`), so that the floor pays the same tracepoint
/// dispatch as the probe.
#[tracepoint]
pub fn count_other(_ctx: TracePointContext) -> u32 {
    count(counter::FLOOR_OTHER);
    0
}

/// The raw-tracepoint floor on `inet_sock_set_state`: counts every run, as the raw probe
/// program does (it reads the protocol only where it creates an entry).
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn count_state_changes_raw(_ctx: RawTracePointContext) -> i32 {
    count(counter::STATE_CHANGES);
    0
}

/// The raw-tracepoint floor on the other tracepoint: counts every run.
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn count_other_raw(_ctx: RawTracePointContext) -> i32 {
    count(counter::FLOOR_OTHER);
    0
}

/// Whether a state change needs more than counting: the rest (`SYN_RECV` of a new child,
/// `FIN_WAIT2`, `CLOSE_WAIT`, `CLOSING`, …) do not.
#[inline(always)]
fn wanted(newstate: i32) -> bool {
    matches!(
        newstate,
        TCP_SYN_SENT | TCP_ESTABLISHED | TCP_CLOSE | TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_LISTEN
    )
}

/// The life cycle of every TCP connection (`sock:inet_sock_set_state`), classic form.
#[tracepoint]
pub fn conn_state(ctx: TracePointContext) -> u32 {
    let protocol: u16 = field(&ctx, set_state::PROTOCOL);
    if protocol != IPPROTO_TCP {
        return 0;
    }
    count(counter::STATE_CHANGES);
    let newstate: i32 = field(&ctx, set_state::NEWSTATE);
    if wanted(newstate) {
        let sk: u64 = field(&ctx, set_state::SKADDR);
        let oldstate: i32 = field(&ctx, set_state::OLDSTATE);
        on_state_change(&Record(&ctx), sk, oldstate, newstate);
    }
    0
}

/// The life cycle of every TCP connection, raw form. Counts every state change the
/// tracepoint reports (TCP, and the rare SCTP or MPTCP socket) without reading the protocol.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn conn_state_raw(ctx: RawTracePointContext) -> i32 {
    count(counter::STATE_CHANGES);
    let newstate = ctx.arg::<u64>(raw_arg::NEWSTATE) as i32;
    if wanted(newstate) {
        let sk: u64 = ctx.arg(raw_arg::SK);
        let oldstate = ctx.arg::<u64>(raw_arg::OLDSTATE) as i32;
        on_state_change(&Sock(sk), sk, oldstate, newstate);
    }
    0
}

#[inline(always)]
fn insert(sk: u64, info: &ConnInfo) {
    if CONNS.insert(&sk, info, 0).is_err() {
        count(counter::MAP_INSERT_FAILED);
    }
}

#[inline(always)]
fn on_state_change<S: Source>(source: &S, sk: u64, oldstate: i32, newstate: i32) {
    // The clock is read only where a time is kept (about 36 ns a read on a VM).
    match newstate {
        TCP_SYN_SENT => {
            if !source.is_tcp() {
                return;
            }
            // connect(): process context, the owner is current.
            let mut info = new_conn(sk, direction::ACTIVE, now());
            attribute(&mut info);
            insert(sk, &info);
        }
        TCP_ESTABLISHED if oldstate == TCP_SYN_SENT => {
            let report_now = offsets().open_delay_ns == 0;
            if let Some(ptr) = CONNS.get_ptr_mut(&sk) {
                // SAFETY: a pointer to the map value from the lookup above; entries are
                // only touched by programs handling this socket, serialised by its lock.
                let info = unsafe { &mut *ptr };
                source.read_addresses(info);
                info.established = 1;
                if report_now {
                    let now = now();
                    info.opened = 1;
                    info.last_emit_ns = now;
                    emit(sk, info, kind::OPEN, oldstate, now, SkErr::UNKNOWN);
                }
            } else if source.is_tcp() {
                // Not seen in SYN_SENT (map full or evicted): report it without a process.
                let now = now();
                let mut info = new_conn(sk, direction::ACTIVE, now);
                source.read_addresses(&mut info);
                info.established = 1;
                if report_now {
                    info.opened = 1;
                    emit(sk, &info, kind::OPEN, oldstate, now, SkErr::UNKNOWN);
                }
                insert(sk, &info);
            }
        }
        TCP_ESTABLISHED if oldstate == TCP_SYN_RECV => {
            if !source.is_tcp() {
                return;
            }
            // Handshake completed in softirq: the owner is the listener's, when known (see the
            // module documentation).
            let now = now();
            let mut info = new_conn(sk, direction::PASSIVE, now);
            source.read_addresses(&mut info);
            info.established = 1;
            attribute_to_listener(&mut info);
            if offsets().open_delay_ns == 0 {
                info.opened = 1;
                emit(sk, &info, kind::OPEN, oldstate, now, SkErr::UNKNOWN);
            }
            insert(sk, &info);
        }
        TCP_LISTEN => {
            if source.is_tcp() {
                on_listen(source, sk);
            }
        }
        // Only `close()` or `shutdown()` enter these states: process context, the owner's.
        TCP_FIN_WAIT1 | TCP_LAST_ACK => {
            if let Some(ptr) = CONNS.get_ptr_mut(&sk) {
                // SAFETY: as above.
                let info = unsafe { &mut *ptr };
                if info.attributed == 0 {
                    attribute(info);
                }
            }
        }
        TCP_CLOSE => {
            if let Some(ptr) = CONNS.get_ptr_mut(&sk) {
                // SAFETY: as above.
                let info = unsafe { &mut *ptr };
                // SAFETY: a field of the map value; see `emit` for why it is set first.
                unsafe { core::ptr::write_volatile(&mut info.closed, 1) };
                let sk_err = SkErr::read(sk);
                // An abort with no error from an open connection is the owner's `close()`
                // (unread data, or SO_LINGER 0) or `shutdown()`: a reset or time-out the
                // kernel sees sets `sk_err` before the state changes.
                if info.attributed == 0
                    && sk_err.known
                    && sk_err.value == 0
                    && (oldstate == TCP_ESTABLISHED || oldstate == TCP_CLOSE_WAIT)
                {
                    attribute(info);
                }
                // Established connections have their final addresses; an active open that
                // failed gets its local port read now.
                if info.established == 0 {
                    source.read_addresses(info);
                }
                emit(sk, info, kind::CLOSE, oldstate, now(), sk_err);
                let _ = CONNS.remove(&sk);
            } else if oldstate == TCP_LISTEN {
                if source.is_tcp() {
                    on_listener_close(source, sk);
                }
            } else if oldstate != TCP_SYN_RECV && source.is_tcp() {
                // Neither a listener nor a half-open passive socket: a connection we lost
                // track of (evicted, or opened before the probe was attached).
                count(counter::UNTRACKED);
            }
        }
        _ => {}
    }
}

/// Counts retransmitted segments per connection (`tcp:tcp_retransmit_skb`), for kernels where
/// `tcp_sock.total_retrans` cannot be read.
#[tracepoint]
pub fn conn_retransmit(ctx: TracePointContext) -> u32 {
    on_retransmit(field(&ctx, RETRANSMIT_SKADDR));
    0
}

/// [`conn_retransmit`], raw form.
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn conn_retransmit_raw(ctx: RawTracePointContext) -> i32 {
    on_retransmit(ctx.arg(raw_arg::SK));
    0
}

#[inline(always)]
fn on_retransmit(sk: u64) {
    if let Some(ptr) = CONNS.get_ptr_mut(&sk) {
        // SAFETY: map value pointer from the lookup; a lost increment under a race only
        // matters on kernels without BTF, where this count is used.
        unsafe { (*ptr).retransmits += 1 };
    }
}

/// Writes an update record with the current counters of a live connection. Never attached:
/// the agent runs it on demand (`BPF_PROG_TEST_RUN`, arguments: the socket's address and the
/// connection's start time from its `CONNS` entry) when the connection is due one. Returns a
/// [`report`] code.
///
/// Written without the `raw_tracepoint` macro, which discards the program's return value
/// (aya-ebpf 0.2 returns 0 whatever the body returns); the section is the one the macro uses.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/inet_sock_set_state")]
pub fn conn_report(ctx: *mut core::ffi::c_void) -> u32 {
    report_update(&RawTracePointContext::new(ctx))
}

#[inline(always)]
fn report_update(ctx: &RawTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let start_ns: u64 = ctx.arg(1);
    let Some(ptr) = CONNS.get_ptr_mut(&sk) else {
        return report::GONE;
    };
    // SAFETY: map value pointer from the lookup.
    let info = unsafe { &mut *ptr };
    // Another connection may have taken the socket's address since the agent read the map.
    if info.start_ns != start_ns || info.established == 0 {
        return report::GONE;
    }
    let now = now();
    info.last_emit_ns = now;
    emit(sk, info, kind::UPDATE, TCP_ESTABLISHED, now, SkErr::UNKNOWN)
}

/// fexit on `inet_csk_accept`: the process that accepted a passive open (on kernels that
/// allow tracing programs; elsewhere the owner is learnt when it closes the connection).
#[fexit(function = "inet_csk_accept")]
pub fn conn_accept(ctx: FExitContext) -> i32 {
    let sk: u64 = match ctx.ret::<u64>() {
        Ok(sk) => sk,
        Err(_) => return 0,
    };
    if sk == 0 {
        return 0;
    }
    if let Some(ptr) = CONNS.get_ptr_mut(&sk) {
        // The accepting process, even over the listener's owner: with pre-forked servers it
        // is the worker, not the parent that called `listen()`.
        // SAFETY: map value pointer from the lookup.
        attribute(unsafe { &mut *ptr });
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible so the programs may call GPL-only helpers (`bpf_probe_read_kernel`, …).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
