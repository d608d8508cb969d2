//! Turns the kernel's ring buffer records into [`ConnectionEvent`]s (before enrichment).

use std::net::{Ipv6Addr, SocketAddr};

use edgeward_common::{
    Header, ListenRecord, OwnerRecord, PortRecord, SocketRecord, direction, flags, kind,
};

use super::event::{CloseReason, ConnectionEvent, Direction, EventKind, SmolStr};

// TCP states (`include/net/tcp_states.h`), as the records and /proc/net/tcp give them.
pub(crate) const TCP_ESTABLISHED: u8 = 1;
pub(crate) const TCP_SYN_SENT: u8 = 2;
pub(crate) const TCP_SYN_RECV: u8 = 3;
const TCP_FIN_WAIT2: u8 = 5;
pub(crate) const TCP_TIME_WAIT: u8 = 6;
pub(crate) const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
pub(crate) const TCP_LISTEN: u8 = 10;
const TCP_CLOSING: u8 = 11;
pub(crate) const TCP_NEW_SYN_RECV: u8 = 12;

const EPIPE: i32 = 32;
const ECONNRESET: i32 = 104;
const ETIMEDOUT: i32 = 110;
const ECONNREFUSED: i32 = 111;

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is shorter than its kind's layout (or than a [`Header`]).
    #[error("ring buffer record of {0} bytes is shorter than its layout")]
    Short(usize),
    /// An unknown `kind` or `direction` value.
    #[error("ring buffer record has kind {kind} and direction {direction}")]
    Unknown {
        /// The kind byte.
        kind: u8,
        /// The direction byte.
        direction: u8,
    },
}

/// Reads little-endian fields in order (the record layouts of `edgeward_common` are
/// `#[repr(C)]` without implicit padding).
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let (head, rest) = self.0.split_at(N.min(self.0.len()));
        out[..head.len()].copy_from_slice(head);
        self.0 = rest;
        out
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    /// The owner fields of an [`OwnerRecord`] after its header.
    fn owner(&mut self, r: &mut RawEvent) {
        r.pid = self.u32();
        r.tgid = self.u32();
        r.cgroup_id = self.u64();
        r.comm = self.take();
    }

    /// The fields of a [`PortRecord`] after its header (or of a [`ListenRecord`] after its
    /// owner).
    fn port(&mut self, r: &mut RawEvent) {
        r.netns = self.u32();
        r.lport = self.u16();
    }

    /// The fields of a [`SocketRecord`] after its header: those of a [`PortRecord`], then the
    /// peer port where a port record has padding, and on.
    fn socket(&mut self, r: &mut RawEvent) {
        self.port(r);
        r.rport = self.u16();
        r.saddr = self.take();
        r.daddr = self.take();
        r.bytes_acked = self.u64();
        r.bytes_received = self.u64();
        r.srtt_us = self.u32();
        r.rttvar_us = self.u32();
        r.retransmits = self.u32();
        r.sk_err = self.u32() as i32;
    }
}

/// A connection event as the agent assembles it from the kernel's records (and, in tests,
/// any record expanded to one shape): what [`decode`] turns into a connection event. The
/// kernel never writes this shape; [`read_raw`] fills one from a record of any layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// Kernel address of the socket (identifies the connection while it lives).
    pub sk: u64,
    /// When the connection started (`bpf_ktime_get_ns` at `SYN_SENT` or at the end of a
    /// passive handshake); 0 in close and report records.
    pub start_ns: u64,
    /// `bpf_ktime_get_ns` when this record was written.
    pub ts_ns: u64,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// `tcp_sock.bytes_acked`.
    pub bytes_acked: u64,
    /// `tcp_sock.bytes_received`.
    pub bytes_received: u64,
    /// Thread id.
    pub pid: u32,
    /// Thread group id.
    pub tgid: u32,
    /// Network namespace inode number.
    pub netns: u32,
    /// `tcp_sock.srtt_us >> 3`.
    pub srtt_us: u32,
    /// `tcp_sock.mdev_us >> 2`.
    pub rttvar_us: u32,
    /// Retransmitted segments.
    pub retransmits: u32,
    /// `sock.sk_err` at close (a positive errno).
    pub sk_err: i32,
    /// Local port (host order).
    pub lport: u16,
    /// Peer port (host order).
    pub rport: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    /// [`flags`] bits.
    pub flags: u16,
    /// [`kind`].
    pub kind: u8,
    /// [`direction`].
    pub direction: u8,
    /// The state a close left; the current state in a report.
    pub oldstate: u8,
    /// Local address: 4 bytes for IPv4, 16 for IPv6.
    pub saddr: [u8; 16],
    /// Peer address.
    pub daddr: [u8; 16],
    /// `comm`.
    pub comm: [u8; 16],
}

/// Reads one kernel record (written by a little-endian BPF target) into the shape the tracker
/// takes: a [`RawEvent`] with the fields of its kind's layout, the rest zero. Connect and accept
/// records start their connection at their time.
pub fn read_raw(bytes: &[u8]) -> Result<RawEvent, DecodeError> {
    let short = || DecodeError::Short(bytes.len());
    if bytes.len() < size_of::<Header>() {
        return Err(short());
    }
    let mut f = Fields(bytes);
    let mut r = RawEvent {
        sk: f.u64(),
        ts_ns: f.u64(),
        kind: f.u8(),
        direction: f.u8(),
        oldstate: f.u8(),
        ..RawEvent::default()
    };
    f.u8();
    r.flags = f.u16();
    r.family = f.u16();
    let fits = |size: usize| (bytes.len() >= size).then_some(()).ok_or_else(short);
    match r.kind {
        kind::CONNECT | kind::OWNER => {
            fits(size_of::<OwnerRecord>())?;
            f.owner(&mut r);
        }
        kind::LISTEN => {
            fits(size_of::<ListenRecord>())?;
            f.owner(&mut r);
            f.port(&mut r);
        }
        // With no open delay an accept carries all of its addresses.
        kind::ACCEPT if bytes.len() >= size_of::<SocketRecord>() => f.socket(&mut r),
        kind::ACCEPT | kind::UNLISTEN => {
            fits(size_of::<PortRecord>())?;
            f.port(&mut r);
        }
        kind::CLOSE | kind::REPORT | kind::OPEN => {
            fits(size_of::<SocketRecord>())?;
            f.socket(&mut r);
        }
        kind::RETRANSMIT => {}
        _ => {
            return Err(DecodeError::Unknown {
                kind: r.kind,
                direction: r.direction,
            });
        }
    }
    if matches!(r.kind, kind::CONNECT | kind::ACCEPT) {
        r.start_ns = r.ts_ns;
    }
    Ok(r)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns` (0 if unreadable).
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Converts the kernel's monotonic clock to Unix time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Unix time minus `CLOCK_MONOTONIC`, nanoseconds.
    offset_nanos: i128,
}

impl Clock {
    /// Measures the offset now.
    pub fn now() -> Self {
        let mono = i128::from(monotonic_ns());
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Self {
            offset_nanos: unix - mono,
        }
    }

    /// A fixed offset (tests).
    pub fn with_offset(offset_nanos: i128) -> Self {
        Self { offset_nanos }
    }

    fn unix(self, mono_nanos: u64) -> u64 {
        u64::try_from(mono_nanos as i128 + self.offset_nanos).unwrap_or(0)
    }
}

fn address(bytes: [u8; 16], port: u16) -> SocketAddr {
    SocketAddr::new(Ipv6Addr::from(bytes).to_canonical(), port)
}

fn comm(raw: &[u8; 16]) -> SmolStr {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    match std::str::from_utf8(&raw[..end]) {
        // At most 16 bytes: always inline. (`SmolStr::new` would first look for a run of
        // whitespace it can share, a tenth of the agent's time under churn.)
        Ok(name) => SmolStr::new_inline(name),
        Err(_) => SmolStr::new(String::from_utf8_lossy(&raw[..end])),
    }
}

/// A per-boot unique id from the socket address and its start time (a socket address is
/// reused once the socket is freed; the pair is not).
fn conn_id(sk: u64, start_ns: u64) -> u64 {
    // splitmix64 finaliser over the pair.
    let mut z = sk ^ start_ns.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How a connection ended, from the state it left and the socket's error.
pub fn close_reason(oldstate: u8, sk_err: i32) -> CloseReason {
    match (oldstate, sk_err) {
        (_, ETIMEDOUT) => CloseReason::TimedOut,
        (_, ECONNREFUSED) => CloseReason::Refused,
        // A connect() the application gave up on before any answer.
        (TCP_SYN_SENT, _) => CloseReason::Normal,
        (_, ECONNRESET | EPIPE) => CloseReason::Reset,
        // Straight from ESTABLISHED or CLOSE_WAIT to CLOSE, skipping the FIN states: an
        // abortive close, which sends a RST.
        (TCP_ESTABLISHED | TCP_CLOSE_WAIT, _) => CloseReason::Reset,
        _ => CloseReason::Normal,
    }
}

/// Payload bytes from the kernel's sequence-space counters. `bytes_acked` counts the SYN of an
/// active open and our FIN once acknowledged; `bytes_received` counts the peer's FIN. Which of
/// those happened follows from the direction and the state the connection closed from.
fn payload_bytes(raw: &RawEvent) -> (u64, u64) {
    if raw.flags & flags::TCP_COUNTERS == 0 {
        return (0, 0);
    }
    let syn = u64::from(raw.direction == direction::ACTIVE && raw.bytes_acked > 0);
    let (fin_out, fin_in) = if raw.kind == kind::CLOSE {
        let old = raw.oldstate;
        (
            // FIN_WAIT2, CLOSING and LAST_ACK are left for CLOSE once our FIN is acked.
            matches!(old, TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK) && raw.sk_err == 0,
            // The peer's FIN arrived in FIN_WAIT2 (to TIME_WAIT), CLOSE_WAIT, LAST_ACK,
            // CLOSING.
            matches!(
                old,
                TCP_FIN_WAIT2 | TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING
            ) && raw.sk_err != ECONNRESET,
        )
    } else {
        (false, false)
    };
    (
        raw.bytes_acked.saturating_sub(syn + u64::from(fin_out)),
        raw.bytes_received.saturating_sub(u64::from(fin_in)),
    )
}

/// Decodes one record. `flags` of the record says which fields the kernel could fill in;
/// absent ones are zero.
pub fn decode(raw: &RawEvent, clock: Clock) -> Result<ConnectionEvent, DecodeError> {
    let unknown = || DecodeError::Unknown {
        kind: raw.kind,
        direction: raw.direction,
    };
    let event_kind = match raw.kind {
        kind::OPEN => EventKind::Open,
        kind::UPDATE => EventKind::Update,
        kind::CLOSE => EventKind::Close,
        _ => return Err(unknown()),
    };
    let dir = match raw.direction {
        direction::ACTIVE => Direction::Active,
        direction::PASSIVE => Direction::Passive,
        _ => return Err(unknown()),
    };
    let close = match event_kind {
        EventKind::Close => close_reason(raw.oldstate, raw.sk_err),
        _ => CloseReason::Open,
    };
    let process = raw.flags & flags::PROCESS != 0;
    let (bytes_sent, bytes_received) = payload_bytes(raw);
    Ok(ConnectionEvent {
        kind: event_kind,
        conn_id: conn_id(raw.sk, raw.start_ns),
        direction: dir,
        local: address(raw.saddr, raw.lport),
        peer: address(raw.daddr, raw.rport),
        pid: if process { raw.pid } else { 0 },
        tgid: if process { raw.tgid } else { 0 },
        comm: comm(if process { &raw.comm } else { &[0; 16] }),
        cgroup_id: if process { raw.cgroup_id } else { 0 },
        netns: raw.netns,
        start_unix_nanos: clock.unix(raw.start_ns),
        end_unix_nanos: match event_kind {
            EventKind::Open => 0,
            _ => clock.unix(raw.ts_ns),
        },
        bytes_sent,
        bytes_received,
        srtt_us: raw.srtt_us,
        rttvar_us: raw.rttvar_us,
        retransmits: raw.retransmits,
        close_reason: close,
        started_before_probe: raw.flags & flags::BEFORE_PROBE != 0,
        executable: None,
        container_id: None,
        pod_uid: None,
        edits: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawEvent {
        let mut saddr = [0u8; 16];
        saddr[10] = 0xff;
        saddr[11] = 0xff;
        saddr[12..].copy_from_slice(&[127, 0, 0, 1]);
        RawEvent {
            sk: 0xffff_8880_1234_5678,
            start_ns: 1_000,
            ts_ns: 5_000,
            cgroup_id: 42,
            bytes_acked: 100,
            bytes_received: 200,
            pid: 7,
            tgid: 6,
            netns: 4026531840,
            srtt_us: 30,
            rttvar_us: 10,
            retransmits: 2,
            sk_err: 0,
            lport: 40000,
            rport: 8080,
            family: 2,
            flags: flags::PROCESS | flags::TCP_COUNTERS,
            kind: kind::CLOSE,
            direction: direction::ACTIVE,
            oldstate: 9,
            saddr,
            daddr: saddr,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn v4_mapped_addresses_become_ipv4() {
        let ev = decode(&raw(), Clock::with_offset(1_000_000)).unwrap();
        assert_eq!(ev.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(ev.peer, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(&*ev.comm, "curl");
        assert_eq!(ev.start_unix_nanos, 1_001_000);
        assert_eq!(ev.duration_nanos(), 4_000);
        assert_eq!(ev.close_reason, CloseReason::Normal);
    }

    #[test]
    fn sequence_space_is_not_payload() {
        // Active open closed from LAST_ACK: SYN and FIN acked, peer FIN received.
        let ev = decode(&raw(), Clock::with_offset(0)).unwrap();
        assert_eq!((ev.bytes_sent, ev.bytes_received), (98, 199));
        // Passive side that closed first (FIN_WAIT2 -> TIME_WAIT): FIN each way, no SYN.
        let mut r = raw();
        r.direction = direction::PASSIVE;
        r.oldstate = 5;
        let ev = decode(&r, Clock::with_offset(0)).unwrap();
        assert_eq!((ev.bytes_sent, ev.bytes_received), (99, 199));
        // Open event of an active open: only the SYN.
        r.direction = direction::ACTIVE;
        r.kind = kind::OPEN;
        r.bytes_acked = 1;
        r.bytes_received = 0;
        let ev = decode(&r, Clock::with_offset(0)).unwrap();
        assert_eq!((ev.bytes_sent, ev.bytes_received), (0, 0));
    }

    #[test]
    fn ipv6_stays_ipv6() {
        let mut r = raw();
        r.family = 10;
        r.saddr = Ipv6Addr::LOCALHOST.octets();
        let ev = decode(&r, Clock::with_offset(0)).unwrap();
        assert_eq!(ev.local, "[::1]:40000".parse().unwrap());
    }

    #[test]
    fn close_reasons() {
        assert_eq!(close_reason(2, 111), CloseReason::Refused);
        assert_eq!(close_reason(2, 110), CloseReason::TimedOut);
        assert_eq!(close_reason(1, 110), CloseReason::TimedOut);
        assert_eq!(close_reason(1, 104), CloseReason::Reset);
        assert_eq!(close_reason(1, 0), CloseReason::Reset);
        assert_eq!(close_reason(8, 32), CloseReason::Reset);
        assert_eq!(close_reason(9, 0), CloseReason::Normal);
        assert_eq!(close_reason(5, 0), CloseReason::Normal);
    }

    #[test]
    fn unattributed_records_carry_no_process() {
        let mut r = raw();
        r.flags = 0;
        let ev = decode(&r, Clock::with_offset(0)).unwrap();
        assert_eq!((ev.pid, ev.tgid, &*ev.comm, ev.cgroup_id), (0, 0, "", 0));
    }

    #[test]
    fn process_names_are_read_to_the_first_nul_and_kept_when_not_utf8() {
        let mut r = raw();
        r.comm = *b"fifteen-bytes-x\0";
        assert_eq!(
            decode(&r, Clock::with_offset(0)).unwrap().comm,
            "fifteen-bytes-x"
        );
        // `comm` is bytes to the kernel (prctl PR_SET_NAME takes any): shown, not refused.
        r.comm = *b"w\xffrker\0\0\0\0\0\0\0\0\0\0";
        assert_eq!(
            decode(&r, Clock::with_offset(0)).unwrap().comm,
            "w\u{fffd}rker"
        );
    }

    #[test]
    fn bad_records_are_errors() {
        assert_eq!(read_raw(&[0; 8]).unwrap_err(), DecodeError::Short(8));
        let mut r = raw();
        r.kind = 9;
        assert!(decode(&r, Clock::with_offset(0)).is_err());
    }

    #[test]
    fn record_layouts_match_the_kernel_structs() {
        use std::mem::{offset_of, size_of};
        assert_eq!(
            [
                size_of::<Header>(),
                size_of::<OwnerRecord>(),
                size_of::<PortRecord>(),
                size_of::<ListenRecord>(),
                size_of::<SocketRecord>(),
            ],
            [24, 56, 32, 64, 96]
        );
        assert_eq!(offset_of!(SocketRecord, saddr), 32);
        assert_eq!(offset_of!(SocketRecord, sk_err), 92);
        assert_eq!(offset_of!(OwnerRecord, comm), 40);
        // A close record, byte by byte.
        let mut bytes = vec![0u8; size_of::<SocketRecord>()];
        bytes[0..8].copy_from_slice(&0xffff_8880_0000_1000u64.to_le_bytes());
        bytes[16] = kind::CLOSE;
        bytes[18] = 9; // left LAST_ACK
        bytes[20..22].copy_from_slice(&flags::TCP_COUNTERS.to_le_bytes());
        bytes[28..30].copy_from_slice(&443u16.to_le_bytes()); // lport
        bytes[64..72].copy_from_slice(&1234u64.to_le_bytes()); // bytes_acked
        bytes[92..96].copy_from_slice(&104i32.to_le_bytes()); // sk_err
        let r = read_raw(&bytes).unwrap();
        assert_eq!((r.kind, r.oldstate, r.lport), (kind::CLOSE, 9, 443));
        assert_eq!((r.bytes_acked, r.sk_err, r.start_ns), (1234, 104, 0));
        // A connect record: the owner, and the connection starts at its time.
        let mut bytes = vec![0u8; size_of::<OwnerRecord>()];
        bytes[8..16].copy_from_slice(&777u64.to_le_bytes());
        bytes[16] = kind::CONNECT;
        bytes[24..28].copy_from_slice(&7u32.to_le_bytes()); // pid
        bytes[40..45].copy_from_slice(b"nginx");
        let r = read_raw(&bytes).unwrap();
        assert_eq!(
            (r.kind, r.pid, r.start_ns, r.ts_ns),
            (kind::CONNECT, 7, 777, 777)
        );
        assert_eq!(&r.comm[..5], b"nginx");
        // Too short for its kind.
        assert_eq!(read_raw(&bytes[..40]), Err(DecodeError::Short(40)));
        let mut port = vec![0u8; size_of::<PortRecord>()];
        port[16] = kind::ACCEPT;
        port[24..28].copy_from_slice(&4026531840u32.to_le_bytes());
        port[28..30].copy_from_slice(&80u16.to_le_bytes());
        let r = read_raw(&port).unwrap();
        assert_eq!((r.netns, r.lport, r.rport), (4026531840, 80, 0));
    }

    #[test]
    fn conn_id_differs_for_a_reused_socket() {
        assert_ne!(conn_id(1, 2), conn_id(1, 3));
        assert_eq!(conn_id(1, 2), conn_id(1, 2));
    }
}
