//! Open events that the kernel leaves to the agent.
//!
//! With `probe.open_delay` set, the kernel writes no open records. Most connections on a busy
//! node live far shorter than the delay: they then cost one ring buffer record per end (the
//! close) instead of two. The agent keeps the event contract whole (every connection has
//! exactly one open and one close event, in that order) by
//! - reporting the open of a connection from its close record when the kernel wrote none
//!   ([`flags::OPEN_REPORTED`] clear), and
//! - sweeping the kernel's `CONNS` map for connections past the delay and reporting their open
//!   from the map entry.
//!
//! A connection announced by the sweep is remembered until its close, so that its close
//! produces no second open.

use std::collections::{HashMap, HashSet};

use edgeward_common::{ConnInfo, RawEvent, flags, kind};

use super::{
    decode::{TCP_ESTABLISHED, TCP_SYN_SENT},
    event::{CloseReason, ConnectionEvent, EventKind},
};

/// A connection while it lives: the socket's kernel address and its start time.
pub type Key = (u64, u64);

/// A ring buffer record (or an open the sweep made) on its way to enrichment.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    /// The record.
    pub raw: RawEvent,
    /// A close record whose connection's open the agent reports first, built from the close
    /// once it is decoded and enriched ([`open_from_close`]).
    pub open_first: bool,
}

impl Record {
    /// A record passed on as it is.
    pub fn new(raw: RawEvent) -> Self {
        Self {
            raw,
            open_first: false,
        }
    }
}

/// Which opens the agent has reported on the kernel's behalf.
#[derive(Debug, Default)]
pub struct Opens {
    /// Connections announced by a sweep, with how many sweeps in a row did not see them.
    announced: HashMap<Key, u8>,
}

impl Opens {
    /// Connections announced by a sweep and not closed yet.
    #[cfg(test)]
    pub fn announced(&self) -> usize {
        self.announced.len()
    }

    /// Whether the agent has reported this connection's open (and its close is not in yet).
    pub fn is_announced(&self, key: &Key) -> bool {
        self.announced.contains_key(key)
    }

    /// One record read from the ring buffer, marked to be preceded by its connection's open
    /// when neither the kernel nor the agent has reported that open.
    pub fn on_record(&mut self, raw: RawEvent) -> Record {
        if raw.kind != kind::CLOSE {
            return Record::new(raw);
        }
        let key = (raw.sk, raw.start_ns);
        // Most closes are of connections nobody announced: skip the hashing then.
        let announced = !self.announced.is_empty() && self.announced.remove(&key).is_some();
        // A close straight from SYN_SENT is a failed active open: it never opened.
        let never_opened = raw.oldstate == TCP_SYN_SENT;
        Record {
            raw,
            open_first: !announced && !never_opened && raw.flags & flags::OPEN_REPORTED == 0,
        }
    }

    /// Reports the open of every entry of `CONNS` that is older than `delay_ns` at `now_ns`
    /// (kernel monotonic clock) and has neither an open record nor an announcement yet.
    /// Returns the keys seen, for [`Opens::forget_missing`].
    pub fn sweep(
        &mut self,
        entries: impl IntoIterator<Item = (u64, ConnInfo)>,
        now_ns: u64,
        delay_ns: u64,
        out: &mut impl FnMut(RawEvent),
    ) -> HashSet<Key> {
        let mut seen = HashSet::new();
        for (sk, info) in entries {
            // Still in SYN_SENT: a failed active open has no open event, and one that succeeds
            // later is reported by the kernel or the next sweep.
            if info.opened != 0
                || info.established == 0
                || now_ns.saturating_sub(info.start_ns) < delay_ns
            {
                continue;
            }
            let key = (sk, info.start_ns);
            seen.insert(key);
            if self.announced.insert(key, 0).is_none() {
                out(open_from_entry(sk, &info, now_ns));
            }
        }
        seen
    }

    /// Forgets announced connections that the last two sweeps did not find (evicted from the
    /// map without a close record). Call after draining the ring buffer that follows a sweep,
    /// so that the close records of connections that ended meanwhile have been seen.
    pub fn forget_missing(&mut self, seen: &HashSet<Key>) {
        self.announced.retain(|key, misses| {
            if seen.contains(key) {
                *misses = 0;
                return true;
            }
            *misses += 1;
            *misses < 2
        });
    }
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

/// The open of an idle connection, from its `CONNS` entry.
pub(super) fn open_from_entry(sk: u64, info: &ConnInfo, now_ns: u64) -> RawEvent {
    let mut event_flags = 0;
    if info.attributed != 0 {
        event_flags |= flags::PROCESS;
    }
    if info.netns != 0 {
        event_flags |= flags::NETNS;
    }
    RawEvent {
        sk,
        start_ns: info.start_ns,
        ts_ns: now_ns,
        cgroup_id: info.cgroup_id,
        bytes_acked: 0,
        bytes_received: 0,
        pid: info.pid,
        tgid: info.tgid,
        netns: info.netns,
        srtt_us: 0,
        rttvar_us: 0,
        retransmits: 0,
        sk_err: 0,
        lport: info.lport,
        rport: info.rport,
        family: info.family,
        flags: event_flags,
        kind: kind::OPEN,
        direction: info.direction,
        oldstate: TCP_ESTABLISHED,
        _pad: 0,
        saddr: info.saddr,
        daddr: info.daddr,
        comm: info.comm,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A `CONNS` entry of an attributed, established connection (shared with the probe
    /// module's tests).
    pub(in crate::probe) fn entry(start_ns: u64, opened: u8) -> ConnInfo {
        ConnInfo {
            start_ns,
            last_emit_ns: start_ns,
            cgroup_id: 7,
            pid: 10,
            tgid: 10,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            retransmits: 0,
            direction: 1,
            opened,
            attributed: 1,
            established: 1,
            family: 2,
            lport: 40000,
            rport: 80,
            closed: 0,
            _pad2: 0,
            saddr: [1; 16],
            daddr: [2; 16],
            netns: 4026531840,
            _pad3: 0,
        }
    }

    fn record(sk: u64, info: &ConnInfo, kind_: u8, flags_: u16) -> RawEvent {
        RawEvent {
            kind: kind_,
            flags: flags_,
            bytes_acked: 64,
            srtt_us: 30,
            ..open_from_entry(sk, info, info.start_ns + 5)
        }
    }

    fn collect(f: impl FnOnce(&mut dyn FnMut(RawEvent))) -> Vec<RawEvent> {
        let mut out = Vec::new();
        f(&mut |r| out.push(r));
        out
    }

    #[test]
    fn a_close_without_an_open_record_is_preceded_by_one() {
        let mut opens = Opens::default();
        let info = entry(100, 0);
        let close = record(1, &info, kind::CLOSE, flags::PROCESS | flags::TCP_COUNTERS);
        let out = opens.on_record(close);
        assert!(out.open_first);
        assert_eq!((out.raw.kind, out.raw.bytes_acked), (kind::CLOSE, 64));
        // The open, from the decoded and enriched close.
        let clock = super::super::decode::Clock::with_offset(1_000_000);
        let mut comms = super::super::decode::Comms::default();
        let mut closed = super::super::decode::decode(&out.raw, clock, &mut comms).unwrap();
        closed.executable = Some("curl".into());
        let open = open_from_close(&closed);
        assert_eq!(open.kind, EventKind::Open);
        assert_eq!(
            (open.conn_id, open.start_unix_nanos, open.pid),
            (closed.conn_id, closed.start_unix_nanos, 10)
        );
        assert_eq!(open.executable.as_deref(), Some("curl"));
        assert_eq!((open.local, open.peer), (closed.local, closed.peer));
        assert_eq!(
            (open.bytes_sent, open.srtt_us, open.end_unix_nanos),
            (0, 0, 0)
        );
        assert_eq!(open.close_reason, CloseReason::Open);
        assert_eq!(closed.bytes_sent, 63, "the SYN is not payload");
    }

    #[test]
    fn a_refused_or_timed_out_open_has_no_open_event() {
        let mut opens = Opens::default();
        let close = RawEvent {
            oldstate: TCP_SYN_SENT,
            ..record(1, &entry(100, 0), kind::CLOSE, flags::PROCESS)
        };
        assert!(!opens.on_record(close).open_first);
    }

    #[test]
    fn a_close_after_a_kernel_open_passes_alone() {
        let mut opens = Opens::default();
        let info = entry(100, 1);
        let close = record(1, &info, kind::CLOSE, flags::OPEN_REPORTED);
        assert!(!opens.on_record(close).open_first);
    }

    #[test]
    fn the_sweep_leaves_connections_still_in_syn_sent_alone() {
        let mut opens = Opens::default();
        let connecting = ConnInfo {
            established: 0,
            ..entry(100, 0)
        };
        let out = collect(|f| {
            opens.sweep([(1, connecting)], 10_000, 500, &mut |r| f(r));
        });
        assert!(
            out.is_empty(),
            "a connect() still waiting has no open: {out:?}"
        );
    }

    #[test]
    fn the_sweep_announces_idle_connections_once() {
        let mut opens = Opens::default();
        let (idle, young, reported) = (entry(100, 0), entry(900, 0), entry(50, 1));
        let entries = [(1, idle), (2, young), (3, reported)];
        let out = collect(|f| {
            opens.sweep(entries, 1_000, 500, &mut |r| f(r));
        });
        assert_eq!(out.len(), 1, "only the idle one, past the delay: {out:?}");
        assert_eq!((out[0].sk, out[0].kind, out[0].pid), (1, kind::OPEN, 10));
        // A second sweep and the close add no second open.
        let again = collect(|f| {
            opens.sweep(entries, 2_000, 500, &mut |r| f(r));
        });
        assert_eq!(
            again.len(),
            1,
            "the young one is now past the delay: {again:?}"
        );
        assert_eq!(again[0].sk, 2);
        let close = record(1, &idle, kind::CLOSE, 0);
        assert!(
            !opens.on_record(close).open_first,
            "announced by the sweep already"
        );
        assert_eq!(opens.announced(), 1, "connection 2 is still open");
    }

    #[test]
    fn announcements_of_vanished_entries_are_forgotten_after_two_sweeps() {
        let mut opens = Opens::default();
        let seen = opens.sweep([(1, entry(0, 0))], 1_000, 10, &mut |_| {});
        opens.forget_missing(&seen);
        assert_eq!(opens.announced(), 1);
        let seen = opens.sweep([], 2_000, 10, &mut |_| {});
        opens.forget_missing(&seen);
        assert_eq!(opens.announced(), 1, "one miss is not enough");
        let seen = opens.sweep([], 3_000, 10, &mut |_| {});
        opens.forget_missing(&seen);
        assert_eq!(opens.announced(), 0);
    }
}
