//! The flat batch layout: how a batch of connection events crosses the boundary between the
//! edgeward agent and a policy plugin, as ONE little-endian byte buffer.
//!
//! Both sides use this crate: the agent encodes with [`Encoder`], the plugin SDK reads with
//! [`BatchView`] (zero-copy: accessors read the bytes in place). The layout is versioned with
//! the WIT package `edgeward:policy`; layout [`LAYOUT_VERSION`] 1 goes with package 0.1.x and
//! is described in `plugins/wit/BATCH-LAYOUT.md`.
//!
//! ```text
//! header (16 bytes)   magic "EWB1" | u16 layout version | u16 record size | u32 count
//!                     | u32 offset of the string area
//! records             count × RECORD_SIZE bytes, fields at the offsets in [`field`]
//! string area         UTF-8 bytes; a record names a string by (u32 offset, u32 length)
//!                     relative to the start of the area; offset NO_STRING = absent
//! ```
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::vec::Vec;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The first four bytes of every batch: `EWB1`.
pub const MAGIC: [u8; 4] = *b"EWB1";
/// The version of the layout this crate reads and writes.
pub const LAYOUT_VERSION: u16 = 1;
/// Bytes before the first record.
pub const HEADER_SIZE: usize = 16;
/// Bytes per record.
pub const RECORD_SIZE: usize = 144;
/// The offset of an absent string.
pub const NO_STRING: u32 = u32::MAX;

/// Verdict code: keep the event.
pub const KEEP: u8 = 0;
/// Verdict code: drop the event.
pub const DROP: u8 = 1;

/// Byte offsets of the fields inside a record.
pub mod field {
    /// u64: the connection's id (socket cookie), equal in all its events.
    pub const CONN_ID: usize = 0;
    /// u64: cgroup v2 id of the task.
    pub const CGROUP_ID: usize = 8;
    /// u64: open time, ns since the Unix epoch.
    pub const START_UNIX_NANOS: usize = 16;
    /// u64: close (or counter read) time, ns since the Unix epoch; 0 for open events.
    pub const END_UNIX_NANOS: usize = 24;
    /// u64: bytes sent and acknowledged.
    pub const BYTES_SENT: usize = 32;
    /// u64: bytes received.
    pub const BYTES_RECEIVED: usize = 40;
    /// 16 bytes: local address as IPv6 (IPv4 as `::ffff:a.b.c.d`).
    pub const LOCAL_ADDR: usize = 48;
    /// 16 bytes: peer address as IPv6 (IPv4 as `::ffff:a.b.c.d`).
    pub const PEER_ADDR: usize = 64;
    /// u16: local port.
    pub const LOCAL_PORT: usize = 80;
    /// u16: peer port.
    pub const PEER_PORT: usize = 82;
    /// u8: [`Kind`](super::Kind).
    pub const KIND: usize = 84;
    /// u8: [`Direction`](super::Direction).
    pub const DIRECTION: usize = 85;
    /// u8: [`CloseReason`](super::CloseReason).
    pub const CLOSE_REASON: usize = 86;
    /// u8: bit 0 set = the local address is IPv4, bit 1 = the peer address is IPv4.
    pub const FLAGS: usize = 87;
    /// u32: thread id.
    pub const PID: usize = 88;
    /// u32: process id.
    pub const TGID: usize = 92;
    /// u32: network namespace inode.
    pub const NETNS: usize = 96;
    /// u32: smoothed RTT, µs.
    pub const SRTT_US: usize = 100;
    /// u32: RTT variance, µs.
    pub const RTTVAR_US: usize = 104;
    /// u32: retransmitted segments.
    pub const RETRANSMITS: usize = 108;
    /// string: command name.
    pub const COMM: usize = 112;
    /// string: executable name.
    pub const EXECUTABLE: usize = 120;
    /// string: container id.
    pub const CONTAINER_ID: usize = 128;
    /// string: Kubernetes pod UID.
    pub const POD_UID: usize = 136;
}

const FLAG_LOCAL_V4: u8 = 1;
const FLAG_PEER_V4: u8 = 2;
/// Added within layout 1: readers ignore flag bits they do not know, so a plugin built before
/// it reads on, and one built after it reads `false` from a host that does not set it.
const FLAG_STARTED_BEFORE_PROBE: u8 = 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Kind {
    /// Established (or attempted).
    #[default]
    Open = 0,
    /// Periodic counters.
    Update = 1,
    /// Closed.
    Close = 2,
}

/// Who opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Direction {
    /// This node connected out.
    #[default]
    Active = 0,
    /// This node accepted.
    Passive = 1,
}

/// How the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum CloseReason {
    /// Not closed yet.
    #[default]
    Open = 0,
    /// Orderly close.
    Normal = 1,
    /// Reset after establishment.
    Reset = 2,
    /// Refused (RST in answer to SYN).
    Refused = 3,
    /// Timed out.
    TimedOut = 4,
}

impl CloseReason {
    /// Reset, refused and timed out are failures.
    pub fn is_error(self) -> bool {
        matches!(self, Self::Reset | Self::Refused | Self::TimedOut)
    }
}

/// One event, as the encoder takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<'a> {
    /// Open, update or close.
    pub kind: Kind,
    /// Connection id.
    pub conn_id: u64,
    /// Active or passive.
    pub direction: Direction,
    /// Local address and port.
    pub local: SocketAddr,
    /// Peer address and port.
    pub peer: SocketAddr,
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// Command name.
    pub comm: &'a str,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// Network namespace inode.
    pub netns: u32,
    /// Open time, ns since the epoch.
    pub start_unix_nanos: u64,
    /// Close time, ns since the epoch.
    pub end_unix_nanos: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Smoothed RTT, µs.
    pub srtt_us: u32,
    /// RTT variance, µs.
    pub rttvar_us: u32,
    /// Retransmits.
    pub retransmits: u32,
    /// How it ended.
    pub close_reason: CloseReason,
    /// Executable name.
    pub executable: Option<&'a str>,
    /// Container id.
    pub container_id: Option<&'a str>,
    /// Pod UID.
    pub pod_uid: Option<&'a str>,
    /// The connection was open before the agent's probe started (found at start):
    /// `start_unix_nanos` is when the agent found it, not when it opened.
    pub started_before_probe: bool,
}

impl Default for Record<'_> {
    fn default() -> Self {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        Self {
            kind: Kind::Open,
            conn_id: 0,
            direction: Direction::Active,
            local: any,
            peer: any,
            pid: 0,
            tgid: 0,
            comm: "",
            cgroup_id: 0,
            netns: 0,
            start_unix_nanos: 0,
            end_unix_nanos: 0,
            bytes_sent: 0,
            bytes_received: 0,
            srtt_us: 0,
            rttvar_us: 0,
            retransmits: 0,
            close_reason: CloseReason::Open,
            executable: None,
            container_id: None,
            pod_uid: None,
            started_before_probe: false,
        }
    }
}

/// Builds batches; keeps its buffers between batches so encoding does not allocate once warm.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
    strings: Vec<u8>,
    count: u32,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the batch being built, keeping the allocations.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.strings.clear();
        self.count = 0;
    }

    /// Number of records pushed since the last [`clear`](Self::clear).
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends one record.
    pub fn push(&mut self, r: &Record<'_>) {
        if self.buf.is_empty() {
            self.buf.resize(HEADER_SIZE, 0);
        }
        let start = self.buf.len();
        self.buf.resize(start + RECORD_SIZE, 0);
        let strings = &mut self.strings;
        let rec = &mut self.buf[start..start + RECORD_SIZE];
        put_u64(rec, field::CONN_ID, r.conn_id);
        put_u64(rec, field::CGROUP_ID, r.cgroup_id);
        put_u64(rec, field::START_UNIX_NANOS, r.start_unix_nanos);
        put_u64(rec, field::END_UNIX_NANOS, r.end_unix_nanos);
        put_u64(rec, field::BYTES_SENT, r.bytes_sent);
        put_u64(rec, field::BYTES_RECEIVED, r.bytes_received);
        let (local, local_v4) = v6_bytes(r.local.ip());
        let (peer, peer_v4) = v6_bytes(r.peer.ip());
        rec[field::LOCAL_ADDR..field::LOCAL_ADDR + 16].copy_from_slice(&local);
        rec[field::PEER_ADDR..field::PEER_ADDR + 16].copy_from_slice(&peer);
        put_u16(rec, field::LOCAL_PORT, r.local.port());
        put_u16(rec, field::PEER_PORT, r.peer.port());
        rec[field::KIND] = r.kind as u8;
        rec[field::DIRECTION] = r.direction as u8;
        rec[field::CLOSE_REASON] = r.close_reason as u8;
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        rec[field::FLAGS] = flag(local_v4, FLAG_LOCAL_V4)
            | flag(peer_v4, FLAG_PEER_V4)
            | flag(r.started_before_probe, FLAG_STARTED_BEFORE_PROBE);
        put_u32(rec, field::PID, r.pid);
        put_u32(rec, field::TGID, r.tgid);
        put_u32(rec, field::NETNS, r.netns);
        put_u32(rec, field::SRTT_US, r.srtt_us);
        put_u32(rec, field::RTTVAR_US, r.rttvar_us);
        put_u32(rec, field::RETRANSMITS, r.retransmits);
        put_str(rec, field::COMM, strings, Some(r.comm));
        put_str(rec, field::EXECUTABLE, strings, r.executable);
        put_str(rec, field::CONTAINER_ID, strings, r.container_id);
        put_str(rec, field::POD_UID, strings, r.pod_uid);
        self.count += 1;
    }

    /// Finishes the batch and returns its bytes (valid until the next change).
    pub fn finish(&mut self) -> &[u8] {
        if self.buf.is_empty() {
            self.buf.resize(HEADER_SIZE, 0);
        }
        let strings_at = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&MAGIC);
        put_u16(&mut self.buf, 4, LAYOUT_VERSION);
        put_u16(&mut self.buf, 6, RECORD_SIZE as u16);
        put_u32(&mut self.buf, 8, self.count);
        put_u32(&mut self.buf, 12, strings_at);
        self.buf.extend_from_slice(&self.strings);
        self.strings.clear();
        &self.buf
    }
}

fn v6_bytes(ip: IpAddr) -> ([u8; 16], bool) {
    match ip {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), true),
        IpAddr::V6(v6) => (v6.octets(), false),
    }
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_str(rec: &mut [u8], at: usize, strings: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            put_u32(rec, at, strings.len() as u32);
            put_u32(rec, at + 4, s.len() as u32);
            strings.extend_from_slice(s.as_bytes());
        }
        None => {
            put_u32(rec, at, NO_STRING);
            put_u32(rec, at + 4, 0);
        }
    }
}

/// Why a buffer is not a batch of this layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// Shorter than the header.
    TooShort(usize),
    /// The first four bytes are not `EWB1`.
    BadMagic([u8; 4]),
    /// A layout version this reader does not know.
    Version(u16),
    /// A record size other than [`RECORD_SIZE`].
    RecordSize(u16),
    /// The header promises more records than the buffer holds.
    Truncated {
        /// Records announced.
        count: u32,
        /// Buffer length.
        len: usize,
    },
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooShort(n) => write!(f, "batch of {n} bytes is shorter than its header"),
            Self::BadMagic(m) => write!(f, "batch magic {m:?} is not EWB1"),
            Self::Version(v) => write!(f, "batch layout version {v} (this reader knows 1)"),
            Self::RecordSize(s) => write!(f, "record size {s} (layout 1 has {RECORD_SIZE})"),
            Self::Truncated { count, len } => {
                write!(f, "{count} records do not fit in {len} bytes")
            }
        }
    }
}

impl core::error::Error for LayoutError {}

/// A read-only, zero-copy view of a batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    records: &'a [u8],
    strings: &'a [u8],
    count: usize,
}

impl<'a> BatchView<'a> {
    /// Checks the header and the sizes; fields are read lazily.
    pub fn parse(buf: &'a [u8]) -> Result<Self, LayoutError> {
        if buf.len() < HEADER_SIZE {
            return Err(LayoutError::TooShort(buf.len()));
        }
        let magic = [buf[0], buf[1], buf[2], buf[3]];
        if magic != MAGIC {
            return Err(LayoutError::BadMagic(magic));
        }
        let version = get_u16(buf, 4);
        if version != LAYOUT_VERSION {
            return Err(LayoutError::Version(version));
        }
        let size = get_u16(buf, 6);
        if size as usize != RECORD_SIZE {
            return Err(LayoutError::RecordSize(size));
        }
        let count = get_u32(buf, 8);
        let strings_at = get_u32(buf, 12) as usize;
        let end = (count as usize)
            .checked_mul(RECORD_SIZE)
            .and_then(|n| n.checked_add(HEADER_SIZE));
        match end {
            Some(end) if end <= buf.len() && strings_at == end => Ok(Self {
                records: &buf[HEADER_SIZE..end],
                strings: &buf[end..],
                count: count as usize,
            }),
            _ => Err(LayoutError::Truncated {
                count,
                len: buf.len(),
            }),
        }
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch has no event.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Event `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<EventView<'a>> {
        let at = index.checked_mul(RECORD_SIZE)?;
        let rec = self.records.get(at..at + RECORD_SIZE)?;
        Some(EventView {
            rec,
            strings: self.strings,
        })
    }

    /// The events, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = EventView<'a>> + 'a {
        let strings = self.strings;
        self.records
            .chunks_exact(RECORD_SIZE)
            .map(move |rec| EventView { rec, strings })
    }
}

/// One event of a batch, read in place.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    rec: &'a [u8],
    strings: &'a [u8],
}

impl<'a> EventView<'a> {
    /// Open, update or close (an unknown code reads as `Update`).
    pub fn kind(&self) -> Kind {
        match self.rec[field::KIND] {
            0 => Kind::Open,
            2 => Kind::Close,
            _ => Kind::Update,
        }
    }
    /// Connection id.
    pub fn conn_id(&self) -> u64 {
        get_u64(self.rec, field::CONN_ID)
    }
    /// Active or passive.
    pub fn direction(&self) -> Direction {
        if self.rec[field::DIRECTION] == 1 {
            Direction::Passive
        } else {
            Direction::Active
        }
    }
    /// Local address and port.
    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(self.local_ip(), self.local_port())
    }
    /// Peer address and port.
    pub fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.peer_ip(), self.peer_port())
    }
    /// Local address.
    pub fn local_ip(&self) -> IpAddr {
        self.ip(field::LOCAL_ADDR, FLAG_LOCAL_V4)
    }
    /// Peer address.
    pub fn peer_ip(&self) -> IpAddr {
        self.ip(field::PEER_ADDR, FLAG_PEER_V4)
    }
    /// Local port.
    pub fn local_port(&self) -> u16 {
        get_u16(self.rec, field::LOCAL_PORT)
    }
    /// Peer port.
    pub fn peer_port(&self) -> u16 {
        get_u16(self.rec, field::PEER_PORT)
    }
    /// Thread id.
    pub fn pid(&self) -> u32 {
        get_u32(self.rec, field::PID)
    }
    /// Process id.
    pub fn tgid(&self) -> u32 {
        get_u32(self.rec, field::TGID)
    }
    /// cgroup v2 id.
    pub fn cgroup_id(&self) -> u64 {
        get_u64(self.rec, field::CGROUP_ID)
    }
    /// Network namespace inode.
    pub fn netns(&self) -> u32 {
        get_u32(self.rec, field::NETNS)
    }
    /// Open time, ns since the epoch.
    pub fn start_unix_nanos(&self) -> u64 {
        get_u64(self.rec, field::START_UNIX_NANOS)
    }
    /// Close time, ns since the epoch.
    pub fn end_unix_nanos(&self) -> u64 {
        get_u64(self.rec, field::END_UNIX_NANOS)
    }
    /// Bytes sent.
    pub fn bytes_sent(&self) -> u64 {
        get_u64(self.rec, field::BYTES_SENT)
    }
    /// Bytes received.
    pub fn bytes_received(&self) -> u64 {
        get_u64(self.rec, field::BYTES_RECEIVED)
    }
    /// Smoothed RTT, µs.
    pub fn srtt_us(&self) -> u32 {
        get_u32(self.rec, field::SRTT_US)
    }
    /// RTT variance, µs.
    pub fn rttvar_us(&self) -> u32 {
        get_u32(self.rec, field::RTTVAR_US)
    }
    /// Retransmitted segments.
    pub fn retransmits(&self) -> u32 {
        get_u32(self.rec, field::RETRANSMITS)
    }
    /// How it ended (an unknown code reads as `Open`).
    pub fn close_reason(&self) -> CloseReason {
        match self.rec[field::CLOSE_REASON] {
            1 => CloseReason::Normal,
            2 => CloseReason::Reset,
            3 => CloseReason::Refused,
            4 => CloseReason::TimedOut,
            _ => CloseReason::Open,
        }
    }
    /// Command name ("" if absent or not UTF-8).
    pub fn comm(&self) -> &'a str {
        self.string(field::COMM).unwrap_or("")
    }
    /// Executable name: the file name of the process's executable, or, where the agent may
    /// not read that (docs/operators.md), the process's name (its main thread's `comm`).
    pub fn executable(&self) -> Option<&'a str> {
        self.string(field::EXECUTABLE)
    }
    /// Container id.
    pub fn container_id(&self) -> Option<&'a str> {
        self.string(field::CONTAINER_ID)
    }
    /// Pod UID.
    pub fn pod_uid(&self) -> Option<&'a str> {
        self.string(field::POD_UID)
    }
    /// Whether the connection was open before the agent's probe started (found at start):
    /// its `start_unix_nanos` is then when the agent found it, and its duration is not the
    /// connection's.
    pub fn started_before_probe(&self) -> bool {
        self.rec[field::FLAGS] & FLAG_STARTED_BEFORE_PROBE != 0
    }
    /// The record's raw bytes.
    pub fn raw(&self) -> &'a [u8] {
        self.rec
    }

    fn ip(&self, at: usize, v4_flag: u8) -> IpAddr {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&self.rec[at..at + 16]);
        let v6 = Ipv6Addr::from(octets);
        if self.rec[field::FLAGS] & v4_flag != 0
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return IpAddr::V4(v4);
        }
        IpAddr::V6(v6)
    }

    fn string(&self, at: usize) -> Option<&'a str> {
        let off = get_u32(self.rec, at);
        if off == NO_STRING {
            return None;
        }
        let len = get_u32(self.rec, at + 4) as usize;
        let off = off as usize;
        let bytes = self.strings.get(off..off.checked_add(len)?)?;
        core::str::from_utf8(bytes).ok()
    }
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let a = Record {
            kind: Kind::Close,
            conn_id: 7,
            direction: Direction::Passive,
            local: "10.0.0.1:443".parse().unwrap(),
            peer: "[2001:db8::1]:51000".parse().unwrap(),
            pid: 11,
            tgid: 12,
            comm: "nginx",
            cgroup_id: 13,
            netns: 14,
            start_unix_nanos: 15,
            end_unix_nanos: 16,
            bytes_sent: 17,
            bytes_received: 18,
            srtt_us: 19,
            rttvar_us: 20,
            retransmits: 21,
            close_reason: CloseReason::Reset,
            executable: Some("/usr/sbin/nginx"),
            container_id: None,
            pod_uid: Some("uid-1"),
            started_before_probe: true,
        };
        let b = Record {
            conn_id: 8,
            comm: "curl",
            ..Record::default()
        };
        let mut enc = Encoder::new();
        enc.push(&a);
        enc.push(&b);
        let bytes = enc.finish().to_vec();
        let view = BatchView::parse(&bytes).unwrap();
        assert_eq!(view.len(), 2);
        let e = view.get(0).unwrap();
        assert_eq!(e.kind(), Kind::Close);
        assert_eq!(e.conn_id(), 7);
        assert_eq!(e.direction(), Direction::Passive);
        assert_eq!(e.local(), a.local);
        assert_eq!(e.peer(), a.peer);
        assert_eq!(
            (e.pid(), e.tgid(), e.cgroup_id(), e.netns()),
            (11, 12, 13, 14)
        );
        assert_eq!((e.start_unix_nanos(), e.end_unix_nanos()), (15, 16));
        assert_eq!((e.bytes_sent(), e.bytes_received()), (17, 18));
        assert_eq!((e.srtt_us(), e.rttvar_us(), e.retransmits()), (19, 20, 21));
        assert_eq!(e.close_reason(), CloseReason::Reset);
        assert_eq!(e.comm(), "nginx");
        assert_eq!(e.executable(), Some("/usr/sbin/nginx"));
        assert_eq!(e.container_id(), None);
        assert_eq!(e.pod_uid(), Some("uid-1"));
        assert!(e.started_before_probe());
        // Beside the address flags (the local address is IPv4, the peer IPv6).
        assert_eq!(
            e.raw()[field::FLAGS],
            FLAG_LOCAL_V4 | FLAG_STARTED_BEFORE_PROBE
        );
        let e = view.get(1).unwrap();
        assert_eq!(e.comm(), "curl");
        assert!(!e.started_before_probe());
        assert!(e.peer_ip().is_ipv4());
        assert!(view.get(2).is_none());
        assert_eq!(view.iter().count(), 2);
    }

    #[test]
    fn bad_buffers_are_rejected() {
        assert!(matches!(
            BatchView::parse(b"EWB1"),
            Err(LayoutError::TooShort(4))
        ));
        let mut enc = Encoder::new();
        enc.push(&Record::default());
        let mut bytes = enc.finish().to_vec();
        bytes[4] = 2;
        assert!(matches!(
            BatchView::parse(&bytes),
            Err(LayoutError::Version(2))
        ));
        bytes[4] = 1;
        bytes[8] = 9;
        assert!(matches!(
            BatchView::parse(&bytes),
            Err(LayoutError::Truncated { count: 9, .. })
        ));
        let empty = Encoder::new().finish().to_vec();
        assert!(BatchView::parse(&empty).unwrap().is_empty());
    }
}
