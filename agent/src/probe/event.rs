//! The connection event: what the probe reports about one TCP connection, after enrichment.
//!
//! This type is the contract between the probe (producer), the plugin chain (which sees it as
//! a flat record and returns verdicts) and the exporters (which turn it into spans and
//! metrics). Field meanings follow the OpenTelemetry semantic conventions where one exists.

use std::{net::SocketAddr, sync::Arc};

/// The type of process names in events: inline up to 23 bytes (every `comm`, and most
/// executable names), so that copying an event or dropping one touches no shared counter.
pub use smol_str::SmolStr;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Established (or, for a failed active open, attempted).
    Open,
    /// Periodic counters of a connection that is still open.
    Update,
    /// Closed: the last event of the connection, with final counters and the outcome.
    Close,
}

/// Who opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This node connected out (`connect()`): a span of kind CLIENT.
    Active,
    /// This node accepted it (`accept()`): a span of kind SERVER.
    Passive,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Not closed yet (open and update events).
    Open,
    /// Orderly close (FIN in both directions).
    Normal,
    /// Reset by either side after it was established.
    Reset,
    /// The peer refused an active open (RST in answer to SYN).
    Refused,
    /// An active open or an established connection timed out.
    TimedOut,
}

impl CloseReason {
    /// The value of the `edgeward.tcp.close_reason` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Normal => "normal",
            Self::Reset => "reset",
            Self::Refused => "refused",
            Self::TimedOut => "timed_out",
        }
    }

    /// Refused, reset and timed-out connections are errors (span status ERROR).
    pub fn is_error(self) -> bool {
        matches!(self, Self::Reset | Self::Refused | Self::TimedOut)
    }
}

/// A value of an attribute added by a plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// A string.
    Str(Arc<str>),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

/// An edit a plugin made to a connection's attributes; applied in order after the standard
/// attributes are built, so a plugin can replace (`Set`) or remove (`Remove`) a standard
/// attribute such as `network.peer.address`.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrEdit {
    /// Set `key` to a value, adding it or replacing it.
    Set(Arc<str>, AttrValue),
    /// Remove `key`.
    Remove(Arc<str>),
}

/// One TCP connection event, as the pipeline carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionEvent {
    /// Open, update or close.
    pub kind: EventKind,
    /// A per-boot unique id of the connection, equal in all its events (a hash of the
    /// kernel socket's address and its start time: tracepoint programs cannot ask for the
    /// socket cookie, which the kernel only assigns on demand).
    pub conn_id: u64,
    /// Active or passive open.
    pub direction: Direction,
    /// Local address and port. IPv4-mapped IPv6 addresses are reported as IPv4.
    pub local: SocketAddr,
    /// Peer address and port.
    pub peer: SocketAddr,
    /// Thread id that opened the connection (for passive opens: that accepted it).
    pub pid: u32,
    /// Process id (thread group id) of that thread.
    pub tgid: u32,
    /// The task's command name (`comm`, at most 15 bytes).
    pub comm: SmolStr,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    /// When the connection opened, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// When it closed (close events), or when the counters were read (updates); 0 for open.
    pub end_unix_nanos: u64,
    /// Bytes sent and acknowledged by the peer.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Smoothed round-trip time, microseconds.
    pub srtt_us: u32,
    /// Round-trip time variance (mdev), microseconds.
    pub rttvar_us: u32,
    /// Segments retransmitted, in total.
    pub retransmits: u32,
    /// How it ended; `Open` until it has.
    pub close_reason: CloseReason,
    /// The connection was open before the probe started (found in /proc at start): its
    /// `start_unix_nanos` is when the agent found it, not when it opened. Its counters are the
    /// connection's totals all the same.
    pub started_before_probe: bool,
    /// Executable name of the process (enrichment: the basename of `/proc/TGID/exe`, or the
    /// process's name from `/proc/TGID/comm` where that link may not be read; `None` when
    /// unknown).
    pub executable: Option<SmolStr>,
    /// Container id from the cgroup path (enrichment).
    pub container_id: Option<Arc<str>>,
    /// Kubernetes pod UID from the cgroup path (enrichment).
    pub pod_uid: Option<Arc<str>>,
    /// Attribute edits made by plugins, in order.
    pub edits: Vec<AttrEdit>,
}

impl ConnectionEvent {
    /// Duration from open to close (or to the last update), in nanoseconds.
    pub fn duration_nanos(&self) -> u64 {
        self.end_unix_nanos.saturating_sub(self.start_unix_nanos)
    }
}
