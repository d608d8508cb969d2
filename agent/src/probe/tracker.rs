//! Connections in flight: the agent's half of the probe's bookkeeping.
//!
//! The kernel programs keep no state per connection: they write a record when a connection
//! starts (connect, accept), when its owner or its listener becomes known, and when it closes,
//! and answer reports the agent asks for. The [`Tracker`] joins those records, in ring-buffer
//! order, into the connection events the rest of the agent sees (open, update, close), in a
//! table bounded by `probe.max_connections`, and keeps the event contract whole: every
//! connection end has exactly one open and one close, in that order, with updates between.
//!
//! - A connection that closes within `open_delay` gets its open from its close (the agent
//!   reports both together: [`Record::open_first`]).
//! - One that lives longer is announced by [`Tracker::sweep`] after a report from the kernel
//!   (its addresses, and for an active open whether its handshake completed), or at once when
//!   an earlier record gave its addresses.
//! - Every `update_interval` the sweep asks the kernel for a report of each open connection,
//!   which becomes an update.
//! - A passive open's owner is the process listening on its port ([`Owner`] by network
//!   namespace and port, from listen records and from /proc at start), or the one that
//!   closes it when that is unknown.
//! - Connections open before the probe started, found in /proc ([`existing`]), are adopted
//!   once the records written since the programs were attached have been taken
//!   ([`Tracker::adopt`]), and announced at once: by socket address where /proc shows it
//!   (then updates and the close follow as for any connection), else by network namespace and
//!   addresses, to which their close record is matched (no updates). Their events carry
//!   [`flags::BEFORE_PROBE`].

use std::collections::{HashMap, HashSet, VecDeque};

use edgeward_common::{direction, flags, kind};
use rustc_hash::FxBuildHasher;

use super::{
    decode::{RawEvent, TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT},
    event::{CloseReason, ConnectionEvent, EventKind},
    existing,
};

/// A kernel record (or a connection event made from records) on its way to enrichment.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// An open, update or close event.
    pub raw: RawEvent,
    /// A close whose connection's open the agent reports first, built from the close once it
    /// is decoded and enriched.
    pub open_first: bool,
}

impl Record {
    fn event(raw: RawEvent) -> Self {
        Self {
            raw,
            open_first: false,
        }
    }
}

/// The process that owns a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Thread id (the process id when found in /proc).
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// `comm`.
    pub comm: [u8; 16],
    /// cgroup v2 id.
    pub cgroup_id: u64,
}

impl Owner {
    /// The owner in a record, if it has one.
    fn of(raw: &RawEvent) -> Option<Self> {
        (raw.flags & flags::PROCESS != 0).then_some(Self {
            pid: raw.pid,
            tgid: raw.tgid,
            comm: raw.comm,
            cgroup_id: raw.cgroup_id,
        })
    }
}

/// Where a connection's ends are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Addresses {
    family: u16,
    lport: u16,
    rport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

impl Addresses {
    fn of(raw: &RawEvent) -> Option<Self> {
        (raw.flags & flags::ADDRESSES != 0).then_some(Self {
            family: raw.family,
            lport: raw.lport,
            rport: raw.rport,
            saddr: raw.saddr,
            daddr: raw.daddr,
        })
    }

    /// The addresses of a connection found in /proc.
    fn found(c: &existing::Connection) -> Self {
        Self {
            family: c.family,
            lport: c.local.1,
            rport: c.peer.1,
            saddr: c.local.0,
            daddr: c.peer.0,
        }
    }

    /// Its [`Endpoints`] in network namespace `netns`.
    fn endpoints(&self, netns: u32) -> Endpoints {
        (netns, self.lport, self.rport, self.saddr, self.daddr)
    }

    /// The same peer (a report of a socket that another connection has taken since has
    /// another peer, or the same peer from another local port).
    fn same_connection(&self, other: &Self) -> bool {
        self.family == other.family
            && self.rport == other.rport
            && self.daddr == other.daddr
            && (self.lport == 0 || self.lport == other.lport)
    }
}

/// One connection end in flight.
#[derive(Debug, Clone)]
struct Conn {
    start_ns: u64,
    direction: u8,
    owner: Option<Owner>,
    /// The owner is the listener's, which an owner record replaces.
    owner_from_listener: bool,
    addresses: Option<Addresses>,
    netns: Option<u32>,
    /// The handshake completed.
    established: bool,
    /// Its open has been reported.
    announced: bool,
    /// When its open or last update was reported (its start until then).
    last_report_ns: u64,
    /// Retransmit records counted (kernels without `tcp_sock.total_retrans`).
    retransmits: u32,
    /// Open before the probe started: its start is when the agent found it.
    before_probe: bool,
}

/// A connection end by network namespace and addresses (ports, then local and peer address,
/// IPv4 v4-mapped): how a close record is matched to a connection found in /proc without its
/// socket address.
type Endpoints = (u32, u16, u16, [u8; 16], [u8; 16]);

/// The endpoints a record names, if it has its addresses and network namespace.
fn endpoints(raw: &RawEvent) -> Option<Endpoints> {
    Some(Addresses::of(raw)?.endpoints(netns(raw)?))
}

/// What [`Tracker::adopt`] did with the connections found at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Adopted by socket address: open now, updates, close.
    pub by_socket: usize,
    /// Adopted without a socket address: open now; the close is matched by addresses.
    pub by_endpoints: usize,
    /// Left out: closed since the scan, or started after the programs were attached (their
    /// own records have them), or more than the table holds.
    pub skipped: usize,
}

/// How long owner records stay wanted after the last passive open whose listener was unknown.
const OWNERS_WANTED_FOR_NS: u64 = 60_000_000_000;

/// The agent's table of connections in flight and of listening ports.
#[derive(Debug)]
pub struct Tracker {
    conns: HashMap<u64, Conn, FxBuildHasher>,
    /// `(socket, start)` in the order connections started, for evicting the oldest when the
    /// table is full; pairs of connections that have closed are skipped, and compacted away.
    order: VecDeque<(u64, u64)>,
    capacity: usize,
    listeners: HashMap<(u32, u16), (u64, Owner), FxBuildHasher>,
    open_delay_ns: u64,
    update_interval_ns: u64,
    /// Passive opens in the table without an owner.
    unowned: usize,
    /// Owner records are wanted until then (kernel monotonic clock).
    owners_wanted_until: u64,
    /// Owner records are always wanted: the kernel gives no network namespaces, so listeners
    /// cannot be told apart across namespaces and are not used.
    owners_always: bool,
    /// Connections found open at start without a socket address, until their close, with
    /// the id their events carry in place of one (see [`Tracker::adopt`]).
    by_endpoints: HashMap<Endpoints, (u64, Conn), FxBuildHasher>,
    /// Untracked closes until [`Tracker::adopt`] (at most `capacity`): connections found at
    /// start that closed before they were adopted.
    startup_closes: Option<Vec<(u64, Option<Endpoints>)>>,
    /// Closes of connections the table did not hold: evicted while open, started before the
    /// probe and not adopted, or whose start record was lost.
    pub untracked: u64,
}

impl Tracker {
    /// A table of at most `capacity` connections (at least one).
    pub fn new(capacity: usize, open_delay_ns: u64, update_interval_ns: u64) -> Self {
        Self {
            conns: HashMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            listeners: HashMap::default(),
            open_delay_ns,
            update_interval_ns,
            unowned: 0,
            owners_wanted_until: 0,
            owners_always: false,
            by_endpoints: HashMap::default(),
            startup_closes: Some(Vec::new()),
            untracked: 0,
        }
    }

    /// Sockets in the table whose addresses are not known yet (active opens whose records so
    /// far had none): reports on them before [`Tracker::adopt`] let it tell them from
    /// connections found without a socket address.
    pub fn without_addresses(&self) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.addresses.is_none_or(|a| a.lport == 0))
            .map(|(&sk, _)| sk)
            .collect()
    }

    /// Adopts the connections found open at start (`existing::scan`, at `found_ns` on the
    /// kernel's monotonic clock), and announces those established. Called once, after the
    /// records written since the programs were attached have been taken, so that a connection
    /// that closed meanwhile (its close was untracked) or started meanwhile (it is in the
    /// table) is not adopted.
    ///
    /// One without a socket address is held by its network namespace and addresses, which
    /// its close record is matched to, under an id in place of the socket address: its socket
    /// inode with bit 62 set (or its place in `found` with bit 61, for a socket without one),
    /// which no kernel address has. It gets no updates (the kernel reports on sockets by
    /// address), and one still connecting is left out.
    pub fn adopt(
        &mut self,
        found: &[existing::Connection],
        found_ns: u64,
        out: &mut impl FnMut(Record),
    ) -> Adoption {
        let closed = self.startup_closes.take().unwrap_or_default();
        let closed_sockets: HashSet<u64> = closed.iter().map(|(sk, _)| *sk).collect();
        let mut known: HashSet<Endpoints> = closed.iter().filter_map(|(_, e)| *e).collect();
        known.extend(
            self.conns
                .values()
                .filter_map(|c| Some(c.addresses?.endpoints(c.netns?))),
        );
        let mut done = Adoption::default();
        for (i, c) in found.iter().enumerate() {
            let addresses = Addresses::found(c);
            let mut conn = Conn {
                start_ns: found_ns,
                direction: if c.passive {
                    direction::PASSIVE
                } else {
                    direction::ACTIVE
                },
                owner: c.owner,
                owner_from_listener: false,
                addresses: Some(addresses),
                netns: Some(c.netns),
                established: !c.connecting,
                announced: false,
                last_report_ns: found_ns,
                retransmits: 0,
                before_probe: true,
            };
            if let Some(sk) = c.sk {
                if self.conns.contains_key(&sk)
                    || closed_sockets.contains(&sk)
                    || self.conns.len() >= self.capacity
                {
                    done.skipped += 1;
                    continue;
                }
                if conn.established {
                    out(conn.announce(sk, found_ns));
                }
                self.insert(sk, conn);
                done.by_socket += 1;
                continue;
            }
            let key = addresses.endpoints(c.netns);
            // Close records without network namespaces (`owners_always`) cannot match.
            if self.owners_always
                || c.connecting
                || known.contains(&key)
                || self.by_endpoints.len() >= self.capacity
            {
                done.skipped += 1;
                continue;
            }
            let id = if c.inode != 0 {
                1 << 62 | c.inode
            } else {
                1 << 61 | i as u64
            };
            out(conn.announce(id, found_ns));
            self.by_endpoints.insert(key, (id, conn));
            done.by_endpoints += 1;
        }
        done
    }

    /// Records the owner of a listening port found outside the ring buffer (in /proc at
    /// start); a listen record for the same port, earlier or later, wins.
    pub fn seed_listener(&mut self, netns: u32, port: u16, owner: Owner) {
        self.listeners.entry((netns, port)).or_insert((0, owner));
    }

    /// Connections in the table.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether the table is empty.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Always asks for owner records: for kernels whose records carry no network namespace
    /// (no BTF), where a port alone does not say which listener a passive open came through.
    pub fn want_owners_always(&mut self) {
        self.owners_always = true;
    }

    /// Whether the kernel should write owner records (`WANTED`): while passive opens whose
    /// listener is unknown are in the table, and for a while after the last one, so that the
    /// next ones on the same port are attributed too.
    pub fn owners_wanted(&self, now_ns: u64) -> bool {
        self.owners_always || self.unowned > 0 || now_ns < self.owners_wanted_until
    }

    /// Takes one record from the ring buffer; passes on the connection events it completes.
    pub fn on_record(&mut self, raw: RawEvent, out: &mut impl FnMut(Record)) {
        match raw.kind {
            kind::CONNECT => {
                let conn = Conn {
                    owner: Owner::of(&raw),
                    ..Conn::started(&raw, direction::ACTIVE)
                };
                self.insert(raw.sk, conn);
            }
            kind::ACCEPT => {
                // All its addresses only when opens are reported at once; its local port always.
                let started = Conn::started(&raw, direction::PASSIVE);
                let listener = started
                    .netns
                    .and_then(|ns| self.listeners.get(&(ns, raw.lport)).map(|l| l.1));
                if listener.is_none() {
                    self.owners_wanted_until = raw.ts_ns.saturating_add(OWNERS_WANTED_FOR_NS);
                }
                let mut conn = Conn {
                    owner: listener,
                    owner_from_listener: listener.is_some(),
                    established: true,
                    ..started
                };
                if self.open_delay_ns == 0 {
                    out(conn.announce(raw.sk, raw.ts_ns));
                }
                self.insert(raw.sk, conn);
            }
            // An active open's handshake completed (open delay 0, or no reports here).
            kind::OPEN => {
                if let Some(conn) = self.conns.get_mut(&raw.sk) {
                    conn.established = true;
                    conn.addresses = Addresses::of(&raw).or(conn.addresses);
                    conn.netns = netns(&raw).or(conn.netns);
                    if self.open_delay_ns == 0 {
                        out(conn.announce(raw.sk, raw.ts_ns));
                    }
                }
            }
            kind::OWNER => {
                if let (Some(conn), Some(owner)) = (self.conns.get_mut(&raw.sk), Owner::of(&raw))
                    && (conn.owner.is_none() || conn.owner_from_listener)
                {
                    if conn.owner.is_none() && conn.direction == direction::PASSIVE {
                        self.unowned = self.unowned.saturating_sub(1);
                    }
                    conn.owner = Some(owner);
                    conn.owner_from_listener = false;
                }
            }
            kind::LISTEN => {
                if let (Some(ns), Some(owner)) = (netns(&raw), Owner::of(&raw))
                    && raw.lport != 0
                {
                    self.listeners.insert((ns, raw.lport), (raw.sk, owner));
                }
            }
            kind::UNLISTEN => {
                if let Some(ns) = netns(&raw) {
                    let key = (ns, raw.lport);
                    // Another listener on the port (SO_REUSEPORT) may have replaced it; one
                    // found in /proc (no socket address) goes with any close on its port.
                    if self
                        .listeners
                        .get(&key)
                        .is_some_and(|(sk, _)| *sk == raw.sk || *sk == 0)
                    {
                        self.listeners.remove(&key);
                    }
                }
            }
            kind::RETRANSMIT => {
                if let Some(conn) = self.conns.get_mut(&raw.sk) {
                    conn.retransmits = conn.retransmits.saturating_add(1);
                }
            }
            kind::REPORT => self.on_report(&raw, out),
            kind::CLOSE => self.on_close(&raw, out),
            // Records the kernel does not write.
            _ => {}
        }
    }

    /// A report asked for by [`Tracker::sweep`]: the open of a connection past the delay,
    /// then updates.
    fn on_report(&mut self, raw: &RawEvent, out: &mut impl FnMut(Record)) {
        let (open_delay, interval) = (self.open_delay_ns, self.update_interval_ns);
        let Some(conn) = self.conns.get_mut(&raw.sk) else {
            // Closed meanwhile: its close came first.
            return;
        };
        let reported = Addresses::of(raw);
        if let (Some(known), Some(now)) = (conn.addresses, reported)
            && !known.same_connection(&now)
        {
            // Another connection has the socket now: this one's close was lost.
            return;
        }
        match raw.oldstate {
            // Still connecting, or its close record is on its way.
            TCP_SYN_SENT | TCP_CLOSE => return,
            // The state could not be read: keep what the records said.
            u8::MAX => {}
            _ => conn.established = true,
        }
        if !conn.established {
            return;
        }
        conn.addresses = reported.or(conn.addresses);
        conn.netns = netns(raw).or(conn.netns);
        if !conn.announced {
            if raw.ts_ns.saturating_sub(conn.start_ns) >= open_delay {
                out(conn.announce(raw.sk, raw.ts_ns));
            }
            return;
        }
        if interval == 0 || raw.ts_ns.saturating_sub(conn.last_report_ns) < interval {
            return;
        }
        conn.last_report_ns = raw.ts_ns;
        let mut update = conn.event(raw.sk, kind::UPDATE, raw.ts_ns, Some(raw));
        update.oldstate = TCP_ESTABLISHED;
        out(Record::event(update));
    }

    fn on_close(&mut self, raw: &RawEvent, out: &mut impl FnMut(Record)) {
        // A connection found at start without its socket address, under its id. (Should the
        // socket be in the table too, that is the connection: the entry goes.)
        let found = if self.by_endpoints.is_empty() {
            None
        } else {
            endpoints(raw).and_then(|key| self.by_endpoints.remove(&key))
        };
        let (sk, conn) = match (self.remove(raw.sk), found) {
            (Some(conn), _) => (raw.sk, conn),
            (None, Some(found)) => found,
            (None, None) => {
                self.untracked += 1;
                if let Some(closes) = &mut self.startup_closes
                    && closes.len() < self.capacity
                {
                    closes.push((raw.sk, endpoints(raw)));
                }
                return;
            }
        };
        let mut close = conn.event(sk, kind::CLOSE, raw.ts_ns, Some(raw));
        close.oldstate = raw.oldstate;
        close.sk_err = raw.sk_err;
        close.flags |= raw.flags & flags::SK_ERR;
        // The owner's abortive close() names it, if nothing else had.
        if conn.owner.is_none()
            && let Some(owner) = Owner::of(raw)
        {
            set_owner(&mut close, owner);
        }
        // A close straight from SYN_SENT is a failed active open: it never opened.
        let open_first = !conn.announced && raw.oldstate != TCP_SYN_SENT;
        out(Record {
            raw: close,
            open_first,
        });
    }

    /// One sweep of the table at `now_ns` (kernel monotonic clock): announces the connections
    /// past the open delay whose addresses are known, and returns the sockets the kernel
    /// should report on (`conn_report`): connections past the delay that it must say more
    /// about, and open ones due an update.
    pub fn sweep(&mut self, now_ns: u64, out: &mut impl FnMut(Record)) -> Vec<u64> {
        let mut ask = Vec::new();
        let (open_delay, interval) = (self.open_delay_ns, self.update_interval_ns);
        for (&sk, conn) in &mut self.conns {
            if conn.announced {
                if interval > 0 && now_ns.saturating_sub(conn.last_report_ns) >= interval {
                    ask.push(sk);
                }
            } else if open_delay > 0 && now_ns.saturating_sub(conn.start_ns) >= open_delay {
                if conn.established && conn.addresses.is_some_and(|a| a.lport != 0) {
                    out(conn.announce(sk, now_ns));
                } else {
                    ask.push(sk);
                }
            }
        }
        ask
    }

    fn insert(&mut self, sk: u64, conn: Conn) {
        // A socket still in the table is one whose close was lost (a full ring buffer).
        if self.remove(sk).is_some() {
            self.untracked += 1;
        }
        while self.conns.len() >= self.capacity {
            let Some((old, start)) = self.order.pop_front() else {
                break;
            };
            if self.conns.get(&old).is_some_and(|c| c.start_ns == start) {
                // Its close will be counted as untracked.
                self.remove(old);
            }
        }
        if conn.direction == direction::PASSIVE && conn.owner.is_none() {
            self.unowned += 1;
        }
        self.order.push_back((sk, conn.start_ns));
        self.conns.insert(sk, conn);
        // Closed connections leave their pair behind: compact once they outnumber the live.
        if self.order.len() > 2 * self.conns.len() + 1024 {
            let conns = &self.conns;
            self.order
                .retain(|(sk, start)| conns.get(sk).is_some_and(|c| c.start_ns == *start));
        }
    }

    fn remove(&mut self, sk: u64) -> Option<Conn> {
        let conn = self.conns.remove(&sk)?;
        if conn.direction == direction::PASSIVE && conn.owner.is_none() {
            self.unowned = self.unowned.saturating_sub(1);
        }
        Some(conn)
    }
}

impl Conn {
    /// A connection end that `raw` (its connect or accept record) starts: its start, and the
    /// addresses and network namespace the record has; no owner yet, nothing reported.
    fn started(raw: &RawEvent, direction: u8) -> Self {
        Self {
            start_ns: raw.start_ns,
            direction,
            owner: None,
            owner_from_listener: false,
            addresses: Addresses::of(raw),
            netns: netns(raw),
            established: false,
            announced: false,
            last_report_ns: raw.start_ns,
            retransmits: 0,
            before_probe: false,
        }
    }

    /// Marks its open reported at `now_ns` and returns that open (it is established).
    fn announce(&mut self, sk: u64, now_ns: u64) -> Record {
        self.announced = true;
        self.last_report_ns = now_ns;
        let mut open = self.event(sk, kind::OPEN, now_ns, None);
        open.oldstate = TCP_ESTABLISHED;
        Record::event(open)
    }

    /// Its event of `kind`, the socket at `sk`: start, direction and owner from the table;
    /// addresses, network namespace and counters from `record` where it has them.
    fn event(&self, sk: u64, event_kind: u8, ts_ns: u64, record: Option<&RawEvent>) -> RawEvent {
        let mut e = RawEvent {
            sk,
            start_ns: self.start_ns,
            ts_ns,
            kind: event_kind,
            direction: self.direction,
            ..RawEvent::default()
        };
        if let Some(owner) = self.owner {
            set_owner(&mut e, owner);
        }
        if self.before_probe {
            e.flags |= flags::BEFORE_PROBE;
        }
        if let Some(a) = record.and_then(Addresses::of).or(self.addresses) {
            e.family = a.family;
            e.lport = a.lport;
            e.rport = a.rport;
            e.saddr = a.saddr;
            e.daddr = a.daddr;
            e.flags |= flags::ADDRESSES;
        }
        if let Some(ns) = record.and_then(netns).or(self.netns) {
            e.netns = ns;
            e.flags |= flags::NETNS;
        }
        if let Some(r) = record {
            e.bytes_acked = r.bytes_acked;
            e.bytes_received = r.bytes_received;
            e.srtt_us = r.srtt_us;
            e.rttvar_us = r.rttvar_us;
            e.retransmits = if r.flags & flags::TCP_COUNTERS != 0 {
                r.retransmits
            } else {
                self.retransmits
            };
            e.flags |= r.flags & flags::TCP_COUNTERS;
        }
        e
    }
}

fn netns(raw: &RawEvent) -> Option<u32> {
    (raw.flags & flags::NETNS != 0).then_some(raw.netns)
}

fn set_owner(e: &mut RawEvent, owner: Owner) {
    e.pid = owner.pid;
    e.tgid = owner.tgid;
    e.comm = owner.comm;
    e.cgroup_id = owner.cgroup_id;
    e.flags |= flags::PROCESS;
}

/// The open of a connection that closed before its open was reported: the close event's
/// identity, process, addresses and enrichment, with nothing exchanged yet.
pub fn open_from_close(close: &ConnectionEvent) -> ConnectionEvent {
    ConnectionEvent {
        kind: EventKind::Open,
        end_unix_nanos: 0,
        bytes_sent: 0,
        bytes_received: 0,
        srtt_us: 0,
        rttvar_us: 0,
        retransmits: 0,
        close_reason: CloseReason::Open,
        ..close.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::decode::{Clock, decode};

    const SEC: u64 = 1_000_000_000;
    const NS: u32 = 4_026_531_840;

    fn owner(pid: u32, name: &str) -> Owner {
        let mut comm = [0u8; 16];
        comm[..name.len()].copy_from_slice(name.as_bytes());
        Owner {
            pid,
            tgid: pid,
            comm,
            cgroup_id: 7,
        }
    }

    fn v4(last: u8) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&[10, 0, 0, last]);
        a
    }

    /// A kernel record about socket `sk` at `ts`.
    fn record(record_kind: u8, sk: u64, ts: u64) -> RawEvent {
        RawEvent {
            sk,
            ts_ns: ts,
            kind: record_kind,
            ..RawEvent::default()
        }
    }

    fn with_owner(mut r: RawEvent, o: Owner) -> RawEvent {
        set_owner(&mut r, o);
        r
    }

    fn with_addresses(mut r: RawEvent, lport: u16, rport: u16) -> RawEvent {
        r.family = 2;
        r.lport = lport;
        r.rport = rport;
        r.saddr = v4(1);
        r.daddr = v4(2);
        r.netns = NS;
        r.flags |= flags::ADDRESSES | flags::NETNS;
        r
    }

    fn with_counters(mut r: RawEvent, acked: u64, received: u64) -> RawEvent {
        r.bytes_acked = acked;
        r.bytes_received = received;
        r.srtt_us = 42;
        r.flags |= flags::TCP_COUNTERS;
        r
    }

    fn connect(sk: u64, ts: u64, o: Owner) -> RawEvent {
        let mut r = with_addresses(with_owner(record(kind::CONNECT, sk, ts), o), 0, 80);
        r.start_ns = ts;
        r.direction = direction::ACTIVE;
        r
    }

    /// An accept record as the kernel writes it with an open delay: the local port and
    /// network namespace, no addresses.
    fn accept(sk: u64, ts: u64, lport: u16) -> RawEvent {
        let mut r = record(kind::ACCEPT, sk, ts);
        r.lport = lport;
        r.netns = NS;
        r.flags |= flags::NETNS;
        r.start_ns = ts;
        r.direction = direction::PASSIVE;
        r
    }

    fn close(sk: u64, ts: u64, oldstate: u8) -> RawEvent {
        let mut r = with_counters(
            with_addresses(record(kind::CLOSE, sk, ts), 40_000, 80),
            65,
            64,
        );
        r.oldstate = oldstate;
        r.flags |= flags::SK_ERR;
        r
    }

    fn report(sk: u64, ts: u64, state: u8, lport: u16) -> RawEvent {
        let mut r = with_counters(
            with_addresses(record(kind::REPORT, sk, ts), lport, 80),
            9,
            8,
        );
        r.oldstate = state;
        r
    }

    fn run(t: &mut Tracker, records: &[RawEvent]) -> Vec<Record> {
        let mut out = Vec::new();
        for r in records {
            t.on_record(*r, &mut |rec| out.push(rec));
        }
        out
    }

    fn sweep(t: &mut Tracker, now: u64) -> (Vec<Record>, Vec<u64>) {
        let mut out = Vec::new();
        let ask = t.sweep(now, &mut |rec| out.push(rec));
        (out, ask)
    }

    #[test]
    fn a_short_connection_closes_with_its_start_owner_and_open() {
        let mut t = Tracker::new(16, SEC, 30 * SEC);
        let curl = owner(10, "curl");
        let out = run(&mut t, &[connect(1, 100, curl), close(1, 500, 9)]);
        assert_eq!(out.len(), 1, "{out:?}");
        let c = out[0];
        assert!(c.open_first, "its open is reported with it");
        assert_eq!(
            (c.raw.kind, c.raw.direction),
            (kind::CLOSE, direction::ACTIVE)
        );
        assert_eq!((c.raw.start_ns, c.raw.ts_ns), (100, 500));
        assert_eq!((c.raw.pid, c.raw.comm), (10, curl.comm));
        assert_eq!((c.raw.lport, c.raw.rport, c.raw.netns), (40_000, 80, NS));
        assert_eq!((c.raw.bytes_acked, c.raw.srtt_us), (65, 42));
        let all = flags::PROCESS | flags::ADDRESSES | flags::NETNS | flags::TCP_COUNTERS;
        assert_eq!(c.raw.flags & all, all);
        assert!(t.is_empty());
        // What decode makes of it, and the open built from it.
        let event = decode(&c.raw, Clock::with_offset(0)).unwrap();
        assert_eq!(
            event.bytes_sent, 63,
            "neither the SYN nor our acknowledged FIN is payload"
        );
        let open = open_from_close(&event);
        assert_eq!(
            (open.kind, open.conn_id, open.pid),
            (EventKind::Open, event.conn_id, 10)
        );
        assert_eq!((open.bytes_sent, open.end_unix_nanos), (0, 0));
        assert_eq!(open.close_reason, CloseReason::Open);
    }

    #[test]
    fn a_failed_active_open_has_no_open_and_an_unknown_close_is_counted() {
        let mut t = Tracker::new(16, SEC, 0);
        let out = run(
            &mut t,
            &[
                connect(1, 100, owner(10, "curl")),
                close(1, 200, TCP_SYN_SENT),
            ],
        );
        assert!(!out[0].open_first);
        assert_eq!(out[0].raw.pid, 10);
        assert!(run(&mut t, &[close(2, 300, 1)]).is_empty());
        assert_eq!(t.untracked, 1);
    }

    #[test]
    fn passive_opens_take_the_owner_of_the_listener_on_their_port() {
        let mut t = Tracker::new(16, SEC, 0);
        let nginx = owner(20, "nginx");
        let mut listen = with_owner(with_addresses(record(kind::LISTEN, 9, 1), 80, 0), nginx);
        listen.lport = 80;
        let out = run(&mut t, &[listen, accept(1, 100, 80), close(1, 200, 9)]);
        assert_eq!(
            (out[0].raw.pid, out[0].raw.direction),
            (20, direction::PASSIVE)
        );
        assert!(!t.owners_wanted(300));
        // Seeded from /proc: a listen record for the port wins over the seed.
        t.seed_listener(NS, 443, owner(30, "old"));
        t.seed_listener(NS, 80, owner(31, "stale"));
        let out = run(&mut t, &[accept(2, 300, 443), close(2, 400, 9)]);
        assert_eq!(out[0].raw.pid, 30);
        let out = run(&mut t, &[accept(3, 500, 80), close(3, 600, 9)]);
        assert_eq!(out[0].raw.pid, 20);
        // Closing the listener forgets the port; another socket's close does not.
        let mut other = with_addresses(record(kind::UNLISTEN, 8, 700), 80, 0);
        other.lport = 80;
        let mut unlisten = other;
        unlisten.sk = 9;
        run(&mut t, &[other]);
        assert!(t.listeners.contains_key(&(NS, 80)));
        run(&mut t, &[unlisten]);
        assert!(!t.listeners.contains_key(&(NS, 80)));
    }

    #[test]
    fn without_a_known_listener_owner_records_are_wanted_and_name_the_owner() {
        let mut t = Tracker::new(16, SEC, 0);
        run(&mut t, &[accept(1, 100, 8080)]);
        assert!(t.owners_wanted(200));
        let out = run(
            &mut t,
            &[
                with_owner(record(kind::OWNER, 1, 150), owner(40, "app")),
                close(1, 200, 5),
            ],
        );
        assert_eq!(out[0].raw.pid, 40);
        assert!(
            t.owners_wanted(300),
            "for a while after, for the next ones on the port"
        );
        assert!(!t.owners_wanted(100 + OWNERS_WANTED_FOR_NS));
        // An abortive close by its owner names it too.
        let mut abort = close(2, 400, 1);
        set_owner(&mut abort, owner(41, "app"));
        let out = run(&mut t, &[accept(2, 300, 8080), abort]);
        assert_eq!(out[0].raw.pid, 41);
    }

    #[test]
    fn long_lived_connections_are_announced_then_updated() {
        let mut t = Tracker::new(16, SEC, 10 * SEC);
        run(
            &mut t,
            &[connect(1, 0, owner(10, "curl")), accept(2, 0, 80)],
        );
        let (out, ask) = sweep(&mut t, SEC / 2);
        assert!(out.is_empty() && ask.is_empty(), "younger than the delay");
        // Past the delay: the kernel is asked about both (addresses; the handshake).
        let (out, mut ask) = sweep(&mut t, SEC);
        assert!(out.is_empty());
        ask.sort_unstable();
        assert_eq!(ask, [1, 2]);
        let out = run(&mut t, &[report(2, SEC, 1, 80)]);
        assert_eq!((out[0].raw.kind, out[0].raw.sk), (kind::OPEN, 2));
        assert_eq!(
            (out[0].raw.lport, out[0].raw.direction),
            (80, direction::PASSIVE)
        );
        // Still connecting: nothing yet; then established.
        assert!(run(&mut t, &[report(1, SEC, TCP_SYN_SENT, 0)]).is_empty());
        let out = run(&mut t, &[report(1, SEC + 1, 1, 40_000)]);
        assert_eq!(out.len(), 1);
        let open = out[0].raw;
        assert_eq!((open.kind, open.pid, open.lport), (kind::OPEN, 10, 40_000));
        assert_eq!((open.bytes_acked, open.flags & flags::TCP_COUNTERS), (0, 0));
        // Updates every interval, with the counters of the report.
        let (_, ask) = sweep(&mut t, 5 * SEC);
        assert!(ask.is_empty());
        let (_, mut ask) = sweep(&mut t, 11 * SEC + 1);
        ask.sort_unstable();
        assert_eq!(ask, [1, 2]);
        let out = run(&mut t, &[report(1, 11 * SEC + 2, 1, 40_000)]);
        assert_eq!(out.len(), 1);
        let update = out[0].raw;
        assert_eq!(
            (update.kind, update.bytes_acked, update.pid),
            (kind::UPDATE, 9, 10)
        );
        // The close after an announcement carries no second open.
        let out = run(&mut t, &[close(1, 12 * SEC, 9)]);
        assert!(!out[0].open_first);
    }

    #[test]
    fn reports_of_closed_or_reused_sockets_are_ignored() {
        let mut t = Tracker::new(16, SEC, 0);
        run(&mut t, &[connect(1, 0, owner(10, "curl"))]);
        // The socket now belongs to a connection to another peer.
        let mut other = report(1, 2 * SEC, 1, 40_000);
        other.rport = 443;
        assert!(run(&mut t, &[other]).is_empty());
        assert!(run(&mut t, &[report(1, 2 * SEC, TCP_CLOSE, 40_000)]).is_empty());
        run(&mut t, &[close(1, 3 * SEC, 9)]);
        assert!(run(&mut t, &[report(1, 4 * SEC, 1, 40_000)]).is_empty());
    }

    #[test]
    fn with_no_open_delay_opens_are_reported_as_they_happen() {
        let mut t = Tracker::new(16, 0, 0);
        // Without a delay the kernel's accept record has all the addresses.
        let mut full = with_addresses(accept(1, 100, 80), 80, 40_000);
        full.lport = 80;
        let out = run(&mut t, &[full]);
        assert_eq!(
            (out[0].raw.kind, out[0].raw.direction),
            (kind::OPEN, direction::PASSIVE)
        );
        assert_eq!((out[0].raw.lport, out[0].raw.rport), (80, 40_000));
        let mut established = with_addresses(record(kind::OPEN, 2, 300), 40_001, 80);
        established.direction = direction::ACTIVE;
        let out = run(&mut t, &[connect(2, 200, owner(10, "curl")), established]);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].raw.kind, out[0].raw.lport, out[0].raw.pid),
            (kind::OPEN, 40_001, 10)
        );
        let out = run(&mut t, &[close(2, 400, 9)]);
        assert!(!out[0].open_first);
    }

    #[test]
    fn retransmit_records_count_where_the_kernel_gives_no_counters() {
        let mut t = Tracker::new(16, SEC, 0);
        let rt = record(kind::RETRANSMIT, 1, 150);
        let mut bare = close(1, 200, 9);
        bare.flags &= !flags::TCP_COUNTERS;
        let out = run(&mut t, &[connect(1, 100, owner(10, "curl")), rt, rt, bare]);
        assert_eq!(out[0].raw.retransmits, 2);
    }

    #[test]
    fn the_table_holds_at_most_its_capacity_and_forgets_the_oldest() {
        let mut t = Tracker::new(2, SEC, 0);
        let curl = owner(10, "curl");
        run(
            &mut t,
            &[
                connect(1, 1, curl),
                connect(2, 2, curl),
                connect(3, 3, curl),
            ],
        );
        assert_eq!(t.len(), 2);
        assert!(
            run(&mut t, &[close(1, 9, 9)]).is_empty(),
            "evicted: untracked"
        );
        assert_eq!(t.untracked, 1);
        assert_eq!(run(&mut t, &[close(2, 9, 9), close(3, 9, 9)]).len(), 2);
        // A socket reused while the table still holds it: its close was lost.
        run(&mut t, &[connect(4, 10, curl), connect(4, 11, curl)]);
        assert_eq!((t.len(), t.untracked), (1, 2));
        // Pairs of closed connections do not pile up.
        for i in 0..5_000u64 {
            run(
                &mut t,
                &[connect(100 + i, 20 + i, curl), close(100 + i, 30 + i, 9)],
            );
        }
        assert!(
            t.order.len() <= 2 * t.conns.len() + 1024 + 1,
            "{}",
            t.order.len()
        );
    }

    /// A connection end found in /proc: 10.0.0.1:`lport` -> 10.0.0.2:80 in namespace `NS`,
    /// owned by `o`.
    fn found(sk: Option<u64>, lport: u16, o: Option<Owner>) -> existing::Connection {
        existing::Connection {
            sk,
            inode: 900 + u64::from(lport - 40_000),
            netns: NS,
            family: 2,
            local: (v4(1), lport),
            peer: (v4(2), 80),
            passive: false,
            connecting: false,
            owner: o,
        }
    }

    fn adopt(t: &mut Tracker, found: &[existing::Connection], now: u64) -> (Adoption, Vec<Record>) {
        let mut out = Vec::new();
        let done = t.adopt(found, now, &mut |rec| out.push(rec));
        (done, out)
    }

    #[test]
    fn a_connection_found_with_its_socket_address_is_announced_updated_and_closed() {
        let mut t = Tracker::new(16, SEC, 30 * SEC);
        let db = owner(30, "psql");
        let (done, out) = adopt(&mut t, &[found(Some(1), 40_000, Some(db))], 5 * SEC);
        assert_eq!(
            done,
            Adoption {
                by_socket: 1,
                ..Adoption::default()
            }
        );
        assert_eq!(out.len(), 1, "announced at once: {out:?}");
        let open = out[0].raw;
        assert_eq!((open.kind, open.direction), (kind::OPEN, direction::ACTIVE));
        assert_eq!((open.start_ns, open.ts_ns), (5 * SEC, 5 * SEC));
        assert_eq!((open.tgid, open.lport, open.rport), (30, 40_000, 80));
        assert!(open.flags & flags::BEFORE_PROBE != 0);
        assert_eq!(open.netns, NS);
        // Updates on the usual pace, then the close.
        let (_, ask) = sweep(&mut t, 36 * SEC);
        assert_eq!(ask, [1]);
        let out = run(
            &mut t,
            &[report(1, 36 * SEC, 1, 40_000), close(1, 40 * SEC, 9)],
        );
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].raw.kind, kind::UPDATE);
        let c = out[1];
        assert!(!c.open_first);
        assert_eq!((c.raw.kind, c.raw.start_ns), (kind::CLOSE, 5 * SEC));
        assert!(c.raw.flags & out[0].raw.flags & flags::BEFORE_PROBE != 0);
        assert_eq!(c.raw.tgid, 30);
        assert_eq!(t.untracked, 0);
        assert!(t.is_empty());
    }

    #[test]
    fn a_connection_that_closed_or_started_since_the_scan_is_not_adopted() {
        let mut t = Tracker::new(16, SEC, 30 * SEC);
        let curl = owner(10, "curl");
        // Socket 1 was found, then closed before adoption; socket 2 was found, but its
        // connect record (it started after the programs were attached) is in the table.
        let out = run(&mut t, &[close(1, 100, 9), connect(2, 200, curl)]);
        assert!(out.is_empty());
        assert_eq!(t.untracked, 1);
        let (done, out) = adopt(
            &mut t,
            &[
                found(Some(1), 40_000, None),
                found(Some(2), 40_001, None),
                found(Some(3), 40_002, None),
            ],
            300,
        );
        assert_eq!((done.by_socket, done.skipped), (1, 2), "{done:?}");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].raw.sk, 3);
        // Socket 2 closes as the connection its own records describe.
        let out = run(&mut t, &[close(2, 400, 9)]);
        assert_eq!(out[0].raw.flags & flags::BEFORE_PROBE, 0);
        assert_eq!(out[0].raw.tgid, 10);
        // Untracked closes after adoption are not remembered.
        run(&mut t, &[close(9, 500, 9)]);
        assert!(t.startup_closes.is_none());
    }

    #[test]
    fn a_connection_found_without_its_socket_address_is_announced_and_matched_at_close() {
        let mut t = Tracker::new(16, SEC, 30 * SEC);
        let db = owner(30, "psql");
        // Socket 8 started after the programs were attached, on 40001's addresses: the scan
        // saw it too. Its report (asked for its addresses) tells it from a found connection.
        let out = run(
            &mut t,
            &[
                connect(8, 2 * SEC, owner(11, "curl")),
                report(8, 2 * SEC + 1, 1, 40_001),
            ],
        );
        assert!(out.is_empty());
        assert!(t.without_addresses().is_empty());
        let mut connecting = found(None, 40_003, None);
        connecting.connecting = true;
        let (done, out) = adopt(
            &mut t,
            &[
                found(None, 40_000, Some(db)),
                found(None, 40_001, None),
                found(None, 40_002, None),
                connecting,
            ],
            5 * SEC,
        );
        assert_eq!((done.by_endpoints, done.skipped), (2, 2), "{done:?}");
        assert_eq!(out.len(), 2, "announced at once: {out:?}");
        let open = out[0].raw;
        assert_eq!(
            open.sk,
            1 << 62 | 900,
            "the inode stands for the socket address"
        );
        assert_eq!(
            (open.kind, open.start_ns, open.tgid),
            (kind::OPEN, 5 * SEC, 30)
        );
        assert!(open.flags & flags::BEFORE_PROBE != 0);
        assert!(
            sweep(&mut t, 60 * SEC).1.is_empty(),
            "no reports without an address"
        );
        // The close of 40000 (socket 7, never seen) matches by addresses.
        let out = run(&mut t, &[close(7, 70 * SEC, 9)]);
        assert_eq!(out.len(), 1, "{out:?}");
        let c = out[0];
        assert!(!c.open_first);
        assert_eq!(
            (c.raw.sk, c.raw.start_ns, c.raw.tgid),
            (open.sk, 5 * SEC, 30)
        );
        assert!(c.raw.flags & flags::BEFORE_PROBE != 0);
        assert_eq!(c.raw.bytes_received, 64, "counters from the close record");
        assert_eq!(t.untracked, 0);
        // Socket 8 closes as itself.
        let mut r = close(8, 71 * SEC, 9);
        r.lport = 40_001;
        let out = run(&mut t, &[r]);
        assert_eq!((out[0].raw.sk, out[0].raw.start_ns), (8, 2 * SEC));
        assert_eq!(out[0].raw.flags & flags::BEFORE_PROBE, 0);
        assert_eq!(t.by_endpoints.len(), 1, "40002 is still open");
        // Without namespaces in close records, nothing is adopted by addresses.
        let mut t = Tracker::new(16, SEC, 30 * SEC);
        t.want_owners_always();
        let (done, _) = adopt(&mut t, &[found(None, 40_000, None)], 5 * SEC);
        assert_eq!((done.by_endpoints, done.skipped), (0, 1));
    }

    #[test]
    fn a_connection_found_while_connecting_is_announced_once_established() {
        let mut t = Tracker::new(16, SEC, 30 * SEC);
        let mut c = found(Some(4), 40_000, None);
        c.connecting = true;
        let (_, out) = adopt(&mut t, &[c], 5 * SEC);
        assert!(out.is_empty());
        let (out, ask) = sweep(&mut t, 6 * SEC);
        assert!(out.is_empty());
        assert_eq!(ask, [4]);
        let out = run(&mut t, &[report(4, 6 * SEC, 1, 40_000)]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].raw.kind, kind::OPEN);
        assert!(out[0].raw.flags & flags::BEFORE_PROBE != 0);
    }

    #[test]
    fn adoption_stops_at_the_table_capacity() {
        let mut t = Tracker::new(2, SEC, 30 * SEC);
        let all: Vec<_> = (1..=3)
            .map(|sk| found(Some(sk), 40_000 + sk as u16, None))
            .collect();
        let (done, out) = adopt(&mut t, &all, SEC);
        assert_eq!((done.by_socket, done.skipped), (2, 1));
        assert_eq!(out.len(), 2);
        assert_eq!(t.len(), 2);
    }
}
