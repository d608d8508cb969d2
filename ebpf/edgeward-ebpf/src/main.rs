//! edgeward's kernel programs.
//!
//! Built for `bpfel-unknown-none` by the agent's build script (aya-build) and embedded in the
//! agent binary. Programs attach to stable kernel tracepoints (many edge kernels are built
//! without kprobes): `sock:inet_sock_set_state` for the life cycle of every connection, and
//! `tcp:tcp_retransmit_skb` only where BTF does not give `tcp_sock.total_retrans`. Nothing
//! runs per send or receive: the cost is per state change, whatever a connection carries.
//!
//! **No state per connection in the kernel.** Each state change that matters writes one small
//! record to the ring buffer ([`kind`], with a layout per kind), and the agent joins a
//! connection's records in a bounded table of its own: a record costs a fraction of a BPF
//! hash-map insert and delete (and their cache misses), which were most of the probe's cost per
//! connection. Each kind has its own writer, inlined where it is used, so that a run executes
//! (and fetches) little code: the probe runs about ten times per short connection, between
//! which the network stack evicts it from the instruction cache.
//! - `-> SYN_SENT` (`connect()`, process context): a **connect** record with the start time and
//!   the owner (current process).
//! - `SYN_RECV -> ESTABLISHED` (softirq): an **accept** record with the start time, local port
//!   and network namespace (all the addresses when opens are reported at once); the agent
//!   takes the owner from the listener on its port.
//! - `SYN_SENT -> ESTABLISHED`: nothing, unless `open_delay_ns` is 0 (then an **open** record
//!   with the final addresses, for the agent to report at once), or the socket's head cannot
//!   be read (classic tracepoints: reports give no addresses), or the agent cannot run
//!   reports (`WANTED`).
//! - `-> CLOSE`: a **close** record with the final addresses, counters and `sk_err`; with the
//!   owner too when it is an abort without error from an open connection (the owner's
//!   `close()` with unread data or SO_LINGER 0; a reset or time-out the kernel sees sets
//!   `sk_err` first).
//! - `-> LISTEN` (`listen()`, process context) and `LISTEN -> CLOSE`: **listen** / **unlisten**
//!   records, from which the agent knows who owns each listening port.
//! - `-> FIN_WAIT1`, `-> LAST_ACK` (only `close()`/`shutdown()` enter them, in the owner's
//!   context): an **owner** record, only while the agent asks for owners (`WANTED`: it has
//!   passive opens whose listener it does not know).
//! - `conn_report`, run by the agent on demand (`BPF_PROG_TEST_RUN`), never attached: a
//!   **report** record with a live connection's state, addresses and counters, from which the
//!   agent makes the open of a long-lived connection and its periodic updates.
//! - `conn_lookup`, a cgroup skb program run by the agent on demand, never attached: no
//!   record; it finds the socket of a connection open before the agent started, by its
//!   addresses, so that the agent can have reports written on it. (A cgroup skb program loads
//!   with `CAP_BPF` alone; a classifier would need `CAP_NET_ADMIN`, which the shipped
//!   capability set does not grant.)
//!
//! Each tracepoint program comes in two forms with the same logic: a raw tracepoint
//! (`*_raw`, given the `TP_PROTO` arguments: the socket pointer and the states), which the
//! agent uses when the kernel's BTF gives the socket's head fields, and a classic tracepoint
//! (given the formatted record), for kernels without them. A raw tracepoint costs the kernel
//! less per run (no record is formatted before the program runs); in exchange the raw
//! programs read the socket's head (`sock_common`: addresses, ports, state, network namespace;
//! on to `sk_err` and `sk_protocol` where that fits) in one read where they need it. A
//! `bpf_probe_read_kernel` call costs more in place than copying the cache lines between
//! fields (measured: one read of the 620-byte counter span beats five reads of a field each,
//! and one 534-byte head beats three reads).
//!
//! Where the kernel allows tracing programs, `conn_state_typed` (`tp_btf`) replaces the raw
//! form: the same arguments, with the socket a typed pointer, so that its fields are plain
//! loads the verifier checks against BTF (the offsets are constants of the read-only
//! `OFFSETS`) rather than a helper call each.
//!
//! Kernel struct field offsets come from the running kernel's BTF (global `OFFSETS`).
#![no_std]
#![no_main]

use core::cell::Cell;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{self, bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
    macros::{btf_tracepoint, cgroup_skb, fexit, map, raw_tracepoint, tracepoint},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{
        BtfTracePointContext, FExitContext, RawTracePointContext, SkBuffContext, TracePointContext,
    },
};
use edgeward_common::{
    COUNTERS_SPAN_MAX, Header, HeldSocket, ListenRecord, LookupQuery, NO_OFFSET, Offsets,
    OwnerRecord, PortRecord, SOCK_HEAD_MAX, SocketRecord, counter, direction, flags, kind, lookup,
    report, wanted,
};

/// Per-CPU event counters, indexed by [`edgeward_common::counter`].
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Records to the agent. The agent sets the size at load (`probe.ring_buffer_bytes`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Scratch space for reads of spans of the socket: its head ([`scratch::HEAD`]) and the
/// `tcp_sock` span that holds the counters ([`scratch::COUNTERS`]). One set per CPU is enough:
/// the kernel does not nest tracing programs on a CPU (it skips the inner one).
#[map]
static SCRATCH: PerCpuArray<[u8; COUNTERS_SPAN_MAX]> = PerCpuArray::with_max_entries(2, 0);

/// Slots of [`SCRATCH`].
mod scratch {
    pub const HEAD: u32 = 0;
    pub const COUNTERS: u32 = 1;
}

/// Records the agent switches on while it needs them ([`wanted`]: non-zero = on).
#[map]
static WANTED: Array<u32> = Array::with_max_entries(wanted::LEN, 0);

/// The answer of [`conn_lookup`]: the kernel address of the socket it found (valid when it
/// returns [`lookup::FOUND`]). The agent runs one lookup at a time.
#[map]
static LOOKUP_FOUND: Array<u64> = Array::with_max_entries(1, 0);

/// Field offsets from the running kernel's BTF, set by the agent before load.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::UNKNOWN;

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
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

/// `BPF_F_CURRENT_NETNS` for the `netns` argument of socket lookups: the namespace of the
/// packet's device, which in a test run is the running thread's.
const CURRENT_NETNS: u64 = 0xffff_ffff;

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
/// Both pointers must be valid and 8-byte aligned: every 16-byte field of the records sits at
/// a multiple of 8 in an 8-aligned struct, and the head's IPv6 addresses are 8-aligned (the
/// agent sets `sock_head_len` only then).
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
fn field_addr(ctx: &TracePointContext, offset: usize, dst: *mut [u8; 16]) {
    let d = dst as *mut u64;
    // SAFETY: `dst` is a field of an 8-aligned record at a multiple of 8 (see `copy16`).
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

/// The offsets the agent wrote into `OFFSETS` before load. The compiler must not fold in the
/// default values the static is built with, so the pointer to it is read back through a
/// volatile load; each field is then one load where it is used. (A volatile read of the struct
/// itself copied all 24 words at every use: a third of the program's instructions.)
#[inline(always)]
fn offsets() -> &'static Offsets {
    let p: *const Offsets = &OFFSETS;
    // SAFETY: `p` is a valid pointer to a static; reading it back is a plain load, and the
    // static lives in read-only global data for the whole life of the program.
    unsafe { &*core::ptr::read_volatile(&p) }
}

/// Reads `len` bytes of the socket from offset `base` into this CPU's scratch `slot`, for
/// fields to be picked with [`span_ptr`]. `None` when the span is not set (`base` unknown or
/// `len` 0) or cannot be read.
#[inline(always)]
fn read_span(sk: u64, base: u32, len: u32, slot: u32) -> Option<*const u8> {
    if base == NO_OFFSET || len == 0 || len > COUNTERS_SPAN_MAX as u32 || sk == 0 {
        return None;
    }
    let buf = SCRATCH.get_ptr_mut(slot)? as *mut u8;
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

/// Zeroes a reserved record and writes its header.
///
/// # Safety
/// `e` points at a reserved, exclusively owned ring buffer record of type `T`: 8-aligned, a
/// multiple of 8 bytes long, starting with a [`Header`], plain data (all zeroes is a value).
#[inline(always)]
unsafe fn begin<T>(e: *mut T, sk: u64, record: u8, now: u64) {
    let words = e as *mut u64;
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // Volatile: plain zero stores around later field writes become calls into a byte-wise
        // `memset` for the odd-sized gaps.
        // SAFETY: inside the record (the caller).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    let h = e as *mut Header;
    // SAFETY: the record starts with a header (the caller).
    unsafe {
        (*h).sk = sk;
        (*h).ts_ns = now;
        (*h).kind = record;
    }
}

/// Submits a record; wakes the reader only once enough has piled up (it drains on a timer
/// otherwise): a wakeup per record costs an irq_work in the kernel and a context switch in the
/// agent, which at tens of thousands of connections a second dominates.
#[inline(always)]
fn submit<T>(entry: aya_ebpf::maps::ring_buf::RingBufEntry<T>) {
    let threshold = offsets().wakeup_bytes;
    let wakeup = if threshold == 0 || EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wakeup);
    count(counter::EVENTS);
}

/// Writes the current process into an owner record (process context only).
///
/// # Safety
/// `e` points at a reserved owner record.
#[inline(always)]
unsafe fn owner(e: *mut OwnerRecord) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: `e` is a reserved record (the caller); `comm` is a writable 16-byte buffer, and
    // the helper zeroes it on failure. Straight into the record: the helper's safe wrapper
    // returns the name by value, which costs a byte-wise copy.
    unsafe {
        (*e).pid = id as u32;
        (*e).tgid = (id >> 32) as u32;
        bpf_get_current_comm((*e).comm.as_mut_ptr() as *mut _, 16);
        (*e).cgroup_id = bpf_get_current_cgroup_id();
        (*e).head.flags |= flags::PROCESS;
    }
}

/// `sock.sk_err`, when its offset is known.
#[derive(Clone, Copy)]
struct SkErr {
    value: i32,
    known: bool,
}

impl SkErr {
    #[inline(always)]
    fn read<S: Source>(source: &S) -> Self {
        let mut value = 0i32;
        let known = source.read(offsets().sk_err, &mut value);
        Self { value, known }
    }
}

/// `(srtt_us, mdev_us, bytes_acked, bytes_received, total_retrans)` from one read of the
/// `tcp_sock` span that holds them (see `Offsets::counters_base`); `None` when the span is
/// not set or cannot be read.
#[inline(always)]
fn counters_from_span(sk: u64, off: &Offsets) -> Option<(u32, u32, u64, u64, u32)> {
    let base = off.counters_base;
    let buf = read_span(sk, base, off.counters_len, scratch::COUNTERS)?;
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

/// The `tcp_sock` counters `(srtt_us, mdev_us, bytes_acked, bytes_received, total_retrans)`
/// of the socket at `sk`: one read of the span that holds them, or each on its own when that
/// span is not set; `None` when they cannot all be read.
#[inline(always)]
fn read_counters(sk: u64) -> Option<(u32, u32, u64, u64, u32)> {
    let off = offsets();
    if let Some(c) = counters_from_span(sk, off) {
        return Some(c);
    }
    // Every value is a defined zero until read: with `Option`s, LLVM may compute on the
    // payload of a `None` (whatever a register held) before selecting it away, which the
    // verifier rejects.
    let (mut srtt, mut mdev, mut acked, mut received, mut retrans) = (0u32, 0u32, 0u64, 0u64, 0u32);
    let have_srtt = read_into(sk, off.srtt_us, &mut srtt);
    read_into(sk, off.mdev_us, &mut mdev);
    let have_acked = read_into(sk, off.bytes_acked, &mut acked);
    let have_received = read_into(sk, off.bytes_received, &mut received);
    let have_retrans = read_into(sk, off.total_retrans, &mut retrans);
    (have_srtt && have_acked && have_received && have_retrans)
        .then_some((srtt, mdev, acked, received, retrans))
}

/// Writes the socket's `tcp_sock` counters into a socket record.
///
/// # Safety
/// `e` points at a reserved socket record.
#[inline(always)]
unsafe fn counters<S: Source>(e: *mut SocketRecord, source: &S) {
    let (mut srtt, mut mdev, mut acked, mut received, mut retrans) = (0u32, 0u32, 0u64, 0u64, 0u32);
    let known = match source.counters() {
        Some(c) => {
            (srtt, mdev, acked, received, retrans) = c;
            true
        }
        None => false,
    };
    // SAFETY: `e` is a reserved record (the caller).
    unsafe {
        (*e).srtt_us = srtt >> 3;
        (*e).rttvar_us = mdev >> 2;
        (*e).retransmits = retrans;
        // Volatile: two zero stores would otherwise merge into a call to a byte-wise memset.
        core::ptr::write_volatile(&mut (*e).bytes_acked, acked);
        core::ptr::write_volatile(&mut (*e).bytes_received, received);
        if known {
            (*e).head.flags |= flags::TCP_COUNTERS;
        }
    }
}

/// Where a program finds a socket's addresses, ports and network namespace, and whether it is
/// TCP.
trait Source {
    /// Writes family, ports and addresses (IPv4 as v4-mapped IPv6, as the tracepoint record
    /// has them) into a socket record, with the socket's network namespace when it can be
    /// read. Returns the socket's state when the source knows it (raw form), or -1.
    ///
    /// # Safety
    /// `e` points at a reserved socket record.
    unsafe fn socket(&self, e: *mut SocketRecord) -> i32;
    /// Writes the family, local port and network namespace into a port record (not the
    /// addresses: [`flags::ADDRESSES`] stays clear).
    ///
    /// # Safety
    /// `e` points at a reserved port record.
    unsafe fn port(&self, e: *mut PortRecord);
    /// Whether the socket is a TCP socket.
    fn is_tcp(&self) -> bool;
    /// Reads the socket's field at `offset` into `out` (see [`read_into`]).
    fn read<T: Copy>(&self, offset: u32, out: &mut T) -> bool;
    /// Reads the socket's head now, for the fields that follow to come from it (raw form).
    fn load_head(&self);
    /// The socket's `tcp_sock` counters (see [`read_counters`]).
    fn counters(&self) -> Option<(u32, u32, u64, u64, u32)>;
    /// The inode number of the network namespace at `net`, a pointer read from the socket.
    fn net_inum(&self, net: u64) -> Option<u32> {
        net_inum(net)
    }
    /// The field of the socket's head at `offset` (`sock_common`), where the source holds the
    /// socket itself (raw form, once the head is read; typed form); `None` otherwise.
    #[inline(always)]
    fn head_get<T: Copy>(&self, _offset: u32) -> Option<T> {
        None
    }
    /// Copies the 16-byte field of the socket's head at `offset` into `dst` when it can be
    /// read (see [`Source::head_get`]).
    #[inline(always)]
    fn head_addr(&self, _offset: u32, _dst: *mut [u8; 16]) {}

    /// Reads the socket's head (raw form) and says whether the socket is TCP: the protocol
    /// then comes from the head too. For the records that go on to read the socket.
    #[inline(always)]
    fn head_is_tcp(&self) -> bool {
        self.load_head();
        self.is_tcp()
    }

    /// Writes the socket's network namespace (`sk_net`, then the namespace's inode number)
    /// into a record's `netns` and sets [`flags::NETNS`] in `record_flags`, when it can be
    /// read.
    #[inline(always)]
    fn write_netns(&self, netns: &mut u32, record_flags: &mut u16) {
        let mut net = 0u64;
        if self.read(offsets().sk_net, &mut net)
            && let Some(ns) = self.net_inum(net)
        {
            *netns = ns;
            *record_flags |= flags::NETNS;
        }
    }
}

/// The `inet_sock_set_state` record of a classic tracepoint (checked to be TCP already).
struct Record<'a> {
    ctx: &'a TracePointContext,
    sk: u64,
}

impl Source for Record<'_> {
    #[inline(always)]
    unsafe fn socket(&self, e: *mut SocketRecord) -> i32 {
        let ctx = self.ctx;
        // SAFETY: `e` is a reserved record (the caller).
        unsafe {
            (*e).lport = field(ctx, set_state::SPORT);
            (*e).rport = field(ctx, set_state::DPORT);
            (*e).head.family = field(ctx, set_state::FAMILY);
            field_addr(ctx, set_state::SADDR_V6, &mut (*e).saddr);
            field_addr(ctx, set_state::DADDR_V6, &mut (*e).daddr);
            (*e).head.flags |= flags::ADDRESSES;
            self.write_netns(&mut (*e).netns, &mut (*e).head.flags);
        }
        -1
    }

    #[inline(always)]
    unsafe fn port(&self, e: *mut PortRecord) {
        let ctx = self.ctx;
        // SAFETY: `e` is a reserved record (the caller).
        unsafe {
            (*e).lport = field(ctx, set_state::SPORT);
            (*e).head.family = field(ctx, set_state::FAMILY);
            self.write_netns(&mut (*e).netns, &mut (*e).head.flags);
        }
    }

    #[inline(always)]
    fn is_tcp(&self) -> bool {
        true
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: u32, out: &mut T) -> bool {
        read_into(self.sk, offset, out)
    }

    #[inline(always)]
    fn load_head(&self) {}

    #[inline(always)]
    fn counters(&self) -> Option<(u32, u32, u64, u64, u32)> {
        read_counters(self.sk)
    }
}

/// The socket itself (raw tracepoints and `conn_report`): its head (`sock_common`, and further
/// fields of `sock` where the agent extends it) read in one go into the per-CPU scratch slot,
/// and the fields picked at their BTF offsets.
struct Sock {
    sk: u64,
    /// The head in this CPU's scratch slot once read; null until then.
    head: Cell<*const u8>,
}

impl Sock {
    #[inline(always)]
    fn new(sk: u64) -> Self {
        Self {
            sk,
            head: Cell::new(core::ptr::null()),
        }
    }

    /// The socket's head, read on first use.
    #[inline(always)]
    fn head(&self) -> Option<*const u8> {
        let buf = self.head.get();
        if !buf.is_null() {
            return Some(buf);
        }
        let buf = read_span(self.sk, 0, offsets().sock_head_len, scratch::HEAD)?;
        self.head.set(buf);
        Some(buf)
    }

    /// The field at `offset` from the head, if the head has been read and holds it.
    #[inline(always)]
    fn head_field<T: Copy>(&self, offset: u32) -> Option<T> {
        let buf = self.head.get();
        let len = offsets().sock_head_len;
        if buf.is_null() || offset == NO_OFFSET || offset as usize + size_of::<T>() > len as usize {
            return None;
        }
        // SAFETY: `buf` holds the head's `len` bytes, and the field lies within them; fields
        // are naturally aligned in the kernel struct and the head starts at the socket.
        unsafe { span_field(buf, 0, offset, SOCK_HEAD_MAX) }
    }
}

impl Source for Sock {
    #[inline(always)]
    unsafe fn socket(&self, e: *mut SocketRecord) -> i32 {
        if self.head().is_none() {
            return -1;
        }
        // SAFETY: `e` is a reserved record (the caller).
        unsafe { socket_from_head(self, e) }
    }

    #[inline(always)]
    unsafe fn port(&self, e: *mut PortRecord) {
        if self.head().is_some() {
            // SAFETY: `e` is a reserved record (the caller).
            unsafe { port_from_head(self, e) }
        }
    }

    /// From the head read by `socket`/`port`.
    #[inline(always)]
    fn head_get<T: Copy>(&self, offset: u32) -> Option<T> {
        self.head_field(offset)
    }

    #[inline(always)]
    fn head_addr(&self, offset: u32, dst: *mut [u8; 16]) {
        if let Some(p) = span_ptr(self.head.get(), 0, offset, 16, SOCK_HEAD_MAX) {
            // SAFETY: inside the slot (`span_ptr`); the agent only sets `sock_head_len` when
            // the IPv6 addresses are 8-aligned, as `copy16` needs, and `dst` is a field of an
            // 8-aligned record at a multiple of 8.
            unsafe { copy16(dst, p as *const [u8; 16]) };
        }
    }

    #[inline(always)]
    fn is_tcp(&self) -> bool {
        let mut protocol = 0u16;
        self.read(offsets().sk_protocol, &mut protocol) && protocol == IPPROTO_TCP
    }

    /// From the head when it has been read and holds the field, else on its own.
    #[inline(always)]
    fn read<T: Copy>(&self, offset: u32, out: &mut T) -> bool {
        if let Some(v) = self.head_field(offset) {
            *out = v;
            return true;
        }
        read_into(self.sk, offset, out)
    }

    #[inline(always)]
    fn load_head(&self) {
        self.head();
    }

    #[inline(always)]
    fn counters(&self) -> Option<(u32, u32, u64, u64, u32)> {
        read_counters(self.sk)
    }
}

/// The field of a typed kernel pointer at `offset` (constant to the verifier: it comes from
/// the read-only `OFFSETS`); `None` when the offset is unknown.
#[inline(always)]
fn typed_field<T: Copy>(ptr: u64, offset: u32) -> Option<T> {
    if offset == NO_OFFSET {
        return None;
    }
    // SAFETY: `ptr` is a non-null typed pointer the verifier tracks (BTF) and `offset` a field
    // of its struct from the kernel's BTF; the verifier checks the access and the JIT-ed load
    // cannot fault.
    Some(unsafe { core::ptr::read((ptr + offset as u64) as *const T) })
}

/// The socket as a BTF-enabled tracepoint (`tp_btf`) gives it: a typed `struct sock *`, whose
/// fields are plain loads (the verifier checks each against the kernel's BTF, as the offsets
/// are constants of the read-only `OFFSETS`, and the JIT makes them fault-tolerant) instead of
/// a `bpf_probe_read_kernel` call each. The `tcp_sock` that holds the counters (and
/// `inet_sport`, past the end of `struct sock`) comes from `bpf_skc_to_tcp_sock`, which also
/// tells TCP from the rest.
struct Typed {
    sk: u64,
    /// The `tcp_sock` (0: not one), once `asked`.
    tcp: Cell<u64>,
    asked: Cell<bool>,
}

impl Typed {
    #[inline(always)]
    fn new(sk: u64) -> Self {
        Self {
            sk,
            tcp: Cell::new(0),
            asked: Cell::new(false),
        }
    }

    /// The socket as a `tcp_sock`, if it is one.
    #[inline(always)]
    fn tcp(&self) -> Option<u64> {
        if !self.asked.get() {
            // SAFETY: `sk` is the tracepoint's typed socket argument, as the helper needs.
            let tp = unsafe { generated::bpf_skc_to_tcp_sock(self.sk as *mut _) } as u64;
            self.tcp.set(tp);
            self.asked.set(true);
        }
        let tp = self.tcp.get();
        (tp != 0).then_some(tp)
    }

    /// The field of the `tcp_sock` at `offset` (a `sock` offset is one of `tcp_sock` too).
    #[inline(always)]
    fn get<T: Copy>(&self, offset: u32) -> Option<T> {
        if offset == NO_OFFSET {
            return None;
        }
        typed_field(self.tcp()?, offset)
    }

    /// The 16-byte address at `offset`, as two 8-byte loads.
    #[inline(always)]
    fn addr(&self, offset: u32, dst: *mut [u8; 16]) {
        if let (Some(lo), Some(hi)) = (self.get::<u64>(offset), self.get::<u64>(offset + 8)) {
            let d = dst as *mut u64;
            // SAFETY: `dst` is a field of an 8-aligned record at a multiple of 8.
            unsafe {
                *d = lo;
                *d.add(1) = hi;
            }
        }
    }
}

impl Source for Typed {
    #[inline(always)]
    unsafe fn socket(&self, e: *mut SocketRecord) -> i32 {
        // SAFETY: `e` is a reserved record (the caller).
        unsafe { socket_from_head(self, e) }
    }

    #[inline(always)]
    unsafe fn port(&self, e: *mut PortRecord) {
        // SAFETY: `e` is a reserved record (the caller).
        unsafe { port_from_head(self, e) }
    }

    #[inline(always)]
    fn head_get<T: Copy>(&self, offset: u32) -> Option<T> {
        self.get(offset)
    }

    #[inline(always)]
    fn head_addr(&self, offset: u32, dst: *mut [u8; 16]) {
        self.addr(offset, dst);
    }

    #[inline(always)]
    fn is_tcp(&self) -> bool {
        self.tcp().is_some()
    }

    #[inline(always)]
    fn read<T: Copy>(&self, offset: u32, out: &mut T) -> bool {
        match self.get(offset) {
            Some(v) => {
                *out = v;
                true
            }
            None => false,
        }
    }

    #[inline(always)]
    fn load_head(&self) {}

    #[inline(always)]
    fn counters(&self) -> Option<(u32, u32, u64, u64, u32)> {
        let off = offsets();
        Some((
            self.get(off.srtt_us)?,
            self.get(off.mdev_us)?,
            self.get(off.bytes_acked)?,
            self.get(off.bytes_received)?,
            self.get(off.total_retrans)?,
        ))
    }

    #[inline(always)]
    fn net_inum(&self, net: u64) -> Option<u32> {
        // `net` was loaded from the socket's typed `sk_net`: a typed pointer to `struct net`.
        if net == 0 {
            return None;
        }
        typed_field(net, offsets().net_inum)
    }
}

/// [`Source::socket`] of a source that holds the socket itself (raw and typed forms): the
/// state, network namespace, family, ports and addresses from the head's fields.
///
/// # Safety
/// `e` points at a reserved socket record.
#[inline(always)]
unsafe fn socket_from_head<S: Source>(source: &S, e: *mut SocketRecord) -> i32 {
    let off = offsets();
    // SAFETY: `e` is a reserved record (the caller).
    unsafe {
        let state = source.head_get::<u8>(off.skc_state).map_or(-1, i32::from);
        source.write_netns(&mut (*e).netns, &mut (*e).head.flags);
        let Some(family) = source.head_get::<u16>(off.skc_family) else {
            return state;
        };
        (*e).head.family = family;
        if let Some(port) = source.head_get::<u16>(off.skc_dport) {
            (*e).rport = u16::from_be(port);
        }
        if let Some(port) = source.head_get(off.skc_num) {
            (*e).lport = port;
        }
        if family == AF_INET6 {
            source.head_addr(off.skc_v6_rcv_saddr, &mut (*e).saddr);
            source.head_addr(off.skc_v6_daddr, &mut (*e).daddr);
        } else {
            if let Some(addr) = source.head_get(off.skc_rcv_saddr) {
                v4_mapped(addr, &mut (*e).saddr);
            }
            if let Some(addr) = source.head_get(off.skc_daddr) {
                v4_mapped(addr, &mut (*e).daddr);
            }
        }
        (*e).head.flags |= flags::ADDRESSES;
        state
    }
}

/// [`Source::port`] of a source that holds the socket itself: network namespace, family and
/// local port from the head's fields.
///
/// # Safety
/// `e` points at a reserved port record.
#[inline(always)]
unsafe fn port_from_head<S: Source>(source: &S, e: *mut PortRecord) {
    let off = offsets();
    // SAFETY: `e` is a reserved record (the caller).
    unsafe {
        source.write_netns(&mut (*e).netns, &mut (*e).head.flags);
        if let (Some(family), Some(port)) = (
            source.head_get::<u16>(off.skc_family),
            source.head_get::<u16>(off.skc_num),
        ) {
            (*e).head.family = family;
            (*e).lport = port;
        }
    }
}

/// The inode number of the network namespace at `net`.
#[inline(always)]
fn net_inum(net: u64) -> Option<u32> {
    let mut inum = 0u32;
    read_into(net, offsets().net_inum, &mut inum).then_some(inum)
}

/// `::ffff:a.b.c.d` from an IPv4 address as it lies in memory (network order).
#[inline(always)]
fn v4_mapped(addr: u32, dst: *mut [u8; 16]) {
    let d = dst as *mut u64;
    // SAFETY: `dst` is a field of an 8-aligned record at a multiple of 8 (see `copy16`).
    // Little-endian: bytes 8..12 are 00 00 ff ff, bytes 12..16 the address.
    unsafe {
        *d = 0;
        *d.add(1) = 0xffff_0000 | (addr as u64) << 32;
    }
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
/// program does (it reads the protocol only where it writes a record).
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

/// The BTF-typed floor on `inet_sock_set_state`: counts every run, as [`conn_state_typed`]
/// does.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn count_state_changes_typed(_ctx: BtfTracePointContext) -> i32 {
    count(counter::STATE_CHANGES);
    0
}

/// Whether the agent has switched on the records of `slot` ([`wanted`]).
#[inline(always)]
fn is_wanted(slot: u32) -> bool {
    WANTED.get(slot).is_some_and(|w| *w != 0)
}

/// The life cycle of every TCP connection (`sock:inet_sock_set_state`), classic form.
#[tracepoint]
pub fn conn_state(ctx: TracePointContext) -> u32 {
    let protocol: u16 = field(&ctx, set_state::PROTOCOL);
    if protocol != IPPROTO_TCP {
        return 0;
    }
    count(counter::STATE_CHANGES);
    let sk: u64 = field(&ctx, set_state::SKADDR);
    let oldstate: i32 = field(&ctx, set_state::OLDSTATE);
    let newstate: i32 = field(&ctx, set_state::NEWSTATE);
    on_state_change(&Record { ctx: &ctx, sk }, sk, oldstate, newstate);
    0
}

/// The life cycle of every TCP connection, raw form. Counts every state change the
/// tracepoint reports (TCP, and the rare SCTP or MPTCP socket) without reading the protocol;
/// reads it only where it writes a record.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn conn_state_raw(ctx: RawTracePointContext) -> i32 {
    count(counter::STATE_CHANGES);
    let sk: u64 = ctx.arg(raw_arg::SK);
    let oldstate = ctx.arg::<u64>(raw_arg::OLDSTATE) as i32;
    let newstate = ctx.arg::<u64>(raw_arg::NEWSTATE) as i32;
    on_state_change(&Sock::new(sk), sk, oldstate, newstate);
    0
}

/// The life cycle of every TCP connection, BTF-typed form (`tp_btf`): the arguments of the
/// raw form, with the socket a typed pointer whose fields need no helper call to read.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn conn_state_typed(ctx: BtfTracePointContext) -> i32 {
    count(counter::STATE_CHANGES);
    let sk: u64 = ctx.arg(raw_arg::SK);
    let oldstate = ctx.arg::<u64>(raw_arg::OLDSTATE) as i32;
    let newstate = ctx.arg::<u64>(raw_arg::NEWSTATE) as i32;
    on_state_change(&Typed::new(sk), sk, oldstate, newstate);
    0
}

#[inline(always)]
fn on_state_change<S: Source>(source: &S, sk: u64, oldstate: i32, newstate: i32) {
    match newstate {
        // connect(): process context, the owner is current.
        TCP_SYN_SENT => {
            if source.is_tcp() {
                write_owner(sk, kind::CONNECT, direction::ACTIVE);
            }
        }
        TCP_ESTABLISHED if oldstate == TCP_SYN_RECV => {
            if source.head_is_tcp() {
                write_accept(source, sk);
            }
        }
        // With an open delay the agent learns the final addresses later, from a report or
        // the close; a kernel whose socket head cannot be read gives no reports, so it writes
        // them now.
        TCP_ESTABLISHED if oldstate == TCP_SYN_SENT => {
            let off = offsets();
            let at_once = off.open_delay_ns == 0 || off.sock_head_len == 0;
            if at_once || is_wanted(wanted::ESTABLISHED) {
                if source.head_is_tcp() {
                    write_socket(source, sk, kind::OPEN, direction::ACTIVE, oldstate);
                }
            }
        }
        TCP_LISTEN => {
            if source.head_is_tcp() {
                write_listen(source, sk);
            }
        }
        // Only `close()` or `shutdown()` enter these states: process context, the owner's.
        TCP_FIN_WAIT1 | TCP_LAST_ACK => {
            if is_wanted(wanted::OWNERS) {
                write_owner(sk, kind::OWNER, 0);
            }
        }
        TCP_CLOSE => match oldstate {
            // A child socket that never finished its handshake: never reported.
            TCP_SYN_RECV => {}
            TCP_LISTEN => {
                if source.head_is_tcp() {
                    write_port(source, sk, kind::UNLISTEN, 0);
                }
            }
            _ => {
                if source.head_is_tcp() {
                    write_close(source, sk, oldstate);
                }
            }
        },
        _ => {}
    }
}

/// Reserves a record of type `T`; counts a full ring buffer.
#[inline(always)]
fn reserve<T: 'static>() -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        count(counter::RINGBUF_FULL);
    }
    entry
}

/// A connect or owner record: the current process owns `sk`.
#[inline(always)]
fn write_owner(sk: u64, record: u8, dir: u8) {
    let Some(mut entry) = reserve::<OwnerRecord>() else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved, exclusively owned record, which `begin` initialises
    // whole before the fields are set.
    unsafe {
        begin(e, sk, record, now());
        (*e).head.direction = dir;
        owner(e);
    }
    submit(entry);
}

/// A listen record: the current process owns the listening port.
#[inline(always)]
fn write_listen<S: Source>(source: &S, sk: u64) {
    let Some(mut entry) = reserve::<ListenRecord>() else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: as in `write_owner`; the port fields of a listen record follow its owner record
    // as in a port record after its header.
    unsafe {
        begin(e, sk, kind::LISTEN, now());
        owner(&mut (*e).owner);
        let mut port = PortRecord::default();
        source.port(&mut port);
        (*e).netns = port.netns;
        (*e).lport = port.lport;
        (*e).owner.head.family = port.head.family;
        (*e).owner.head.flags |= port.head.flags;
    }
    submit(entry);
}

/// An accept record: the start of a passive open, with its port and network namespace (and,
/// when opens are reported at once, all of its addresses).
#[inline(always)]
fn write_accept<S: Source>(source: &S, sk: u64) {
    if offsets().open_delay_ns == 0 {
        write_socket(source, sk, kind::ACCEPT, direction::PASSIVE, TCP_SYN_RECV);
    } else {
        write_port(source, sk, kind::ACCEPT, direction::PASSIVE);
    }
}

/// A port record about `sk`.
#[inline(always)]
fn write_port<S: Source>(source: &S, sk: u64, record: u8, dir: u8) {
    let Some(mut entry) = reserve::<PortRecord>() else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: as in `write_owner`.
    unsafe {
        begin(e, sk, record, now());
        (*e).head.direction = dir;
        source.port(e);
    }
    submit(entry);
}

/// A socket record about `sk` with its addresses (open, report; the accept of a passive open
/// reported at once).
#[inline(always)]
fn write_socket<S: Source>(source: &S, sk: u64, record: u8, dir: u8, oldstate: i32) -> u32 {
    let Some(mut entry) = reserve::<SocketRecord>() else {
        return report::RING_FULL;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: as in `write_owner`.
    unsafe {
        begin(e, sk, record, now());
        (*e).head.direction = dir;
        (*e).head.oldstate = oldstate as u8;
        let state = source.socket(e);
        // A report gives the socket's current state, and its counters.
        if record == kind::REPORT {
            (*e).head.oldstate = state as u8;
            counters(e, source);
        }
    }
    submit(entry);
    report::WRITTEN
}

/// A close record: final addresses, counters and `sk_err`; the current process too when it is
/// the owner's abortive close.
#[inline(always)]
fn write_close<S: Source>(source: &S, sk: u64, oldstate: i32) {
    let sk_err = SkErr::read(source);
    // An abort with no error from an open connection is the owner's `close()` or
    // `shutdown()`: a reset or time-out the kernel sees sets `sk_err` before the state
    // changes. Its owner record goes first.
    if sk_err.known
        && sk_err.value == 0
        && (oldstate == TCP_ESTABLISHED || oldstate == TCP_CLOSE_WAIT)
    {
        write_owner(sk, kind::OWNER, 0);
    }
    let Some(mut entry) = reserve::<SocketRecord>() else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: as in `write_owner`.
    unsafe {
        begin(e, sk, kind::CLOSE, now());
        (*e).head.oldstate = oldstate as u8;
        source.socket(e);
        // An automatically chosen local port is released before the state change
        // (`skc_num` reads 0); `inet_sport` keeps it.
        if (*e).lport == 0 {
            let mut port = 0u16;
            if source.read(offsets().inet_sport, &mut port) {
                (*e).lport = u16::from_be(port);
            }
        }
        counters(e, source);
        if sk_err.known {
            (*e).sk_err = sk_err.value;
            (*e).head.flags |= flags::SK_ERR;
        }
    }
    submit(entry);
}

/// A retransmitted segment (`tcp:tcp_retransmit_skb`), for kernels where
/// `tcp_sock.total_retrans` cannot be read: the agent counts these records per connection.
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
    let Some(mut entry) = reserve::<Header>() else {
        return;
    };
    // SAFETY: as in `write_owner`.
    unsafe { begin(entry.as_mut_ptr(), sk, kind::RETRANSMIT, now()) };
    submit(entry);
}

/// Writes a report record with the current state, addresses and counters of the socket at the
/// address given as the first argument. Never attached: the agent runs it on demand
/// (`BPF_PROG_TEST_RUN`) for the connections it holds open past `open_delay` and for their
/// updates. Returns a [`report`] code.
///
/// Written without the `raw_tracepoint` macro, which discards the program's return value
/// (aya-ebpf 0.2 returns 0 whatever the body returns); the section is the one the macro uses.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/inet_sock_set_state")]
pub fn conn_report(ctx: *mut core::ffi::c_void) -> u32 {
    let sk: u64 = RawTracePointContext::new(ctx).arg(0);
    if sk == 0 {
        return report::GONE;
    }
    write_socket(&Sock::new(sk), sk, kind::REPORT, 0, 0)
}

/// Looks up a connection by its addresses in the network namespace of the thread that runs
/// it, and writes the socket's kernel address into [`LOOKUP_FOUND`]. Never attached: the
/// agent runs it (`BPF_PROG_TEST_RUN`) for the connections it finds open at start without
/// their socket's address. Returns a [`lookup`] code.
#[cgroup_skb(ingress)]
pub fn conn_lookup(ctx: SkBuffContext) -> i32 {
    lookup_socket(&ctx) as i32
}

#[inline(always)]
fn lookup_socket(ctx: &SkBuffContext) -> u32 {
    let Ok(mut query) = ctx.load::<LookupQuery>(lookup::AT_NETWORK) else {
        return lookup::NOT_FOUND;
    };
    let size = match query.family {
        AF_INET => 12,
        AF_INET6 => 36,
        _ => return lookup::NOT_FOUND,
    };
    // SAFETY: `tuple` is a 40-byte buffer on the stack, larger than either tuple; the helper
    // takes a reference on the socket it returns, released below on every path.
    let sk = unsafe {
        generated::bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            query.tuple.as_mut_ptr() as *mut _,
            size,
            CURRENT_NETNS,
            0,
        )
    };
    if sk.is_null() {
        return lookup::NOT_FOUND;
    }
    // SAFETY: a socket returned by the lookup, held until released.
    let (state, port) = unsafe { ((*sk).state, (*sk).src_port) };
    // A listener comes back when no connection has those addresses.
    let found = state != TCP_LISTEN as u32 && port == u32::from(query.local_port);
    let written = found
        && match LOOKUP_FOUND.get_ptr_mut(0) {
            // SAFETY: the map's only slot, a u64.
            Some(slot) => {
                unsafe { *slot = sk as u64 };
                true
            }
            None => false,
        };
    // SAFETY: the reference the lookup took.
    unsafe { generated::bpf_sk_release(sk as *mut _) };
    if written {
        lookup::FOUND
    } else {
        lookup::NOT_FOUND
    }
}

/// fexit on `inet_csk_accept`: the process that accepted a passive open, as an owner record
/// (on kernels that allow tracing programs; the agent prefers it to the listener's owner).
#[fexit(function = "inet_csk_accept")]
pub fn conn_accept(ctx: FExitContext) -> i32 {
    if let Ok(sk) = ctx.ret::<u64>()
        && sk != 0
    {
        write_owner(sk, kind::OWNER, 0);
    }
    0
}

/// The arguments of a `task_file` iterator program (`struct bpf_iter__task_file`): one 8-byte
/// slot each, as for every tracing program.
#[repr(C)]
struct TaskFile {
    /// `struct bpf_iter_meta *`, whose first field is the `seq_file` to write to.
    meta: u64,
    /// `struct task_struct *`, or null at the end.
    task: u64,
    /// The file descriptor.
    _fd: u64,
    /// `struct file *`, or null at the end.
    file: u64,
}

/// Every TCP socket held by a process, with the process and the socket's network namespace:
/// an iterator (`iter/task_file`) the agent runs once at start, to find the listeners and
/// connections open before the probe in every network namespace. `/proc/PID/fd` and
/// `/proc/PID/ns/net` say the same, but only to a reader with `ptrace` access to the process.
/// The kernel visits each process's files once (threads sharing the table are skipped).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn held_sockets(ctx: *mut core::ffi::c_void) -> i32 {
    // SAFETY: the kernel passes its iterator context, laid out as `TaskFile`.
    unsafe { write_held_socket(&*(ctx as *const TaskFile)) };
    0
}

#[inline(always)]
unsafe fn write_held_socket(ctx: &TaskFile) -> Option<()> {
    const IPPROTO_TCP: u16 = 6;
    let off = offsets();
    let (task, file) = (ctx.task, ctx.file);
    if task == 0 || file == 0 {
        return None;
    }
    // SAFETY: `file` is the iterator's non-null typed file.
    let socket = unsafe { generated::bpf_sock_from_file(file as *mut _) } as u64;
    if socket == 0 {
        return None;
    }
    let sk: u64 = typed_field(socket, off.socket_sk)?;
    if sk == 0
        || typed_field::<u16>(sk, off.sk_protocol)? != IPPROTO_TCP
        || !matches!(typed_field::<u16>(sk, off.skc_family)?, AF_INET | AF_INET6)
    {
        return None;
    }
    let net: u64 = typed_field(sk, off.sk_net)?;
    let inode: u64 = typed_field(file, off.file_inode)?;
    if net == 0 || inode == 0 {
        return None;
    }
    let held = HeldSocket {
        sk,
        inode: typed_field(inode, off.inode_ino)?,
        tgid: typed_field(task, off.task_tgid)?,
        netns: typed_field(net, off.net_inum)?,
        cgroup_id: task_cgroup_id(task, off),
    };
    // SAFETY: `meta` is the iterator's typed metadata, whose first field is its `seq_file`.
    unsafe {
        let seq = core::ptr::read(ctx.meta as *const u64);
        generated::bpf_seq_write(
            seq as *mut _,
            &held as *const HeldSocket as *const _,
            core::mem::size_of::<HeldSocket>() as u32,
        );
    }
    Some(())
}

/// The cgroup v2 id of `task` (`task->cgroups->dfl_cgrp->kn->id`, what
/// `bpf_get_current_cgroup_id` gives for the current task); 0 when a field is unknown or a
/// pointer null. Read with the helper: `task->cgroups` is RCU-protected, which the verifier of
/// some kernels refuses as a plain load, and this runs once per held socket at start.
#[inline(always)]
fn task_cgroup_id(task: u64, off: &Offsets) -> u64 {
    let (mut css_set, mut cgroup, mut kn, mut id) = (0u64, 0u64, 0u64, 0u64);
    if read_into(task, off.task_cgroups, &mut css_set)
        && read_into(css_set, off.css_set_dfl_cgrp, &mut cgroup)
        && read_into(cgroup, off.cgroup_kn, &mut kn)
        && read_into(kn, off.kernfs_node_id, &mut id)
    {
        id
    } else {
        0
    }
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
