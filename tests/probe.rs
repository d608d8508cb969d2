//! The eBPF TCP probe against this kernel: real programs, real connections made by child
//! processes whose pids the test knows, events filtered by the test's own ports and pids
//! (other tests and engineers make TCP connections on this machine at the same time).
//!
//! These tests need root and BPF; without them they fail with a message saying so.

mod support;

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use edgeward::probe::{
    ProbeConfig,
    event::{CloseReason, ConnectionEvent, Direction, EventKind},
};
use edgeward_otlp_sink::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use support::{
    Agent,
    probe::{NetNs, RunningProbe, Traffic, VethPair},
};

const WAIT: Duration = Duration::from_secs(20);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn host_netns() -> u32 {
    std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32
}

fn of_kind(events: &[ConnectionEvent], kind: EventKind, pid: u32) -> Vec<&ConnectionEvent> {
    events
        .iter()
        .filter(|e| e.kind == kind && e.tgid == pid)
        .collect()
}

fn closes_by(events: &[ConnectionEvent], pid: u32) -> usize {
    of_kind(events, EventKind::Close, pid).len()
}

/// N connections each way of known size; every one reported once per end, exactly.
fn known_traffic(host: &str, reported_ip: &str) {
    known_traffic_with(host, reported_ip, ProbeConfig::default());
}

fn known_traffic_with(host: &str, reported_ip: &str, config: ProbeConfig) {
    const N: usize = 5;
    const UP: u64 = 3_000;
    const DOWN: u64 = 50_000;
    let probe = RunningProbe::start(config);
    let t0 = unix_now();
    let mut server = Traffic::spawn(
        None,
        &[
            "server",
            host,
            &N.to_string(),
            &UP.to_string(),
            &DOWN.to_string(),
            "normal",
        ],
    );
    let port = server.port();
    let client = Traffic::spawn(
        None,
        &[
            "client",
            host,
            &port.to_string(),
            &N.to_string(),
            &UP.to_string(),
            &DOWN.to_string(),
        ],
    );
    let (spid, cpid) = (server.pid(), client.pid());
    assert_eq!(client.finish().last().map(String::as_str), Some("done"));
    server.finish();
    let t1 = unix_now();
    probe.wait_events(port, WAIT, "a close per end", |e| {
        closes_by(e, spid) >= N && closes_by(e, cpid) >= N
    });
    // Give duplicates a chance to show up before counting exactly.
    std::thread::sleep(Duration::from_millis(300));
    let events = probe.events_on_port(port);
    let ip: std::net::IpAddr = reported_ip.parse().unwrap();
    let server_addr = SocketAddr::new(ip, port);

    let client_closes = of_kind(&events, EventKind::Close, cpid);
    let server_closes = of_kind(&events, EventKind::Close, spid);
    assert_eq!(client_closes.len(), N, "{host}: {events:#?}");
    assert_eq!(server_closes.len(), N, "{host}: {events:#?}");
    assert_eq!(
        events.len(),
        4 * N,
        "{host}: one open and one close per end, nothing else: {events:#?}"
    );
    for c in &client_closes {
        assert_eq!(c.direction, Direction::Active, "{c:#?}");
        assert_eq!(c.peer, server_addr, "{c:#?}");
        assert_eq!(c.local.ip(), ip, "{c:#?}");
        assert_eq!(
            (c.pid, c.tgid, &*c.comm),
            (cpid, cpid, "ew-client"),
            "{c:#?}"
        );
        assert_eq!((c.bytes_sent, c.bytes_received), (UP, DOWN), "{c:#?}");
        assert_eq!(c.close_reason, CloseReason::Normal, "{c:#?}");
        assert_eq!(c.netns, host_netns(), "{c:#?}");
        assert!(c.cgroup_id != 0, "{c:#?}");
        assert!(c.srtt_us > 0, "{c:#?}");
        assert_eq!(c.retransmits, 0, "{c:#?}");
        assert!(t0 <= c.start_unix_nanos && c.end_unix_nanos <= t1, "{c:#?}");
        assert!(
            c.duration_nanos() > 0 && c.duration_nanos() < 5_000_000_000,
            "{c:#?}"
        );
        // Its server end: same addresses swapped, the server's process, bytes mirrored.
        let s = server_closes
            .iter()
            .find(|s| s.peer == c.local)
            .unwrap_or_else(|| panic!("no server close for {}: {events:#?}", c.local));
        assert_eq!(s.direction, Direction::Passive, "{s:#?}");
        assert_eq!(s.local, server_addr, "{s:#?}");
        assert_eq!(
            (s.pid, s.tgid, &*s.comm),
            (spid, spid, "ew-server"),
            "{s:#?}"
        );
        assert_eq!((s.bytes_sent, s.bytes_received), (DOWN, UP), "{s:#?}");
        assert_eq!(s.close_reason, CloseReason::Normal, "{s:#?}");
        // The server end starts when the handshake completes, after the client's SYN. (Which
        // end closes last depends on which side closes first, a race in this traffic.)
        assert!(
            s.duration_nanos() > 0 && s.start_unix_nanos >= c.start_unix_nanos,
            "{s:#?} {c:#?}"
        );
        // Each end's open event carries the same connection id as its close.
        for end in [c, s] {
            let opens: Vec<_> = events
                .iter()
                .filter(|e| e.kind == EventKind::Open && e.conn_id == end.conn_id)
                .collect();
            assert_eq!(opens.len(), 1, "{end:#?}\n{events:#?}");
            assert_eq!(opens[0].local, end.local);
            assert_eq!(opens[0].tgid, end.tgid);
        }
    }
    // No loss on the way. (`untracked` is left out: connections of other processes that
    // were opened before this probe started may close meanwhile.)
    let status = probe.status.snapshot().probe;
    for reason in [
        "ring_buffer_full",
        "reader_channel_full",
        "output_channel_full",
        "undecodable",
        "nested_run_skipped",
    ] {
        assert_eq!(status.drop_reasons.get(reason), Some(&0), "{status:?}");
    }
}

#[test]
fn ipv4_connections_are_reported_exactly() {
    known_traffic("127.0.0.1", "127.0.0.1");
}

#[test]
fn ipv6_connections_are_reported_exactly() {
    known_traffic("::1", "::1");
}

#[test]
fn v4_mapped_ipv6_connections_are_reported_as_ipv4() {
    known_traffic("::ffff:127.0.0.1", "127.0.0.1");
}

/// The classic-tracepoint programs (what kernels without the socket fields in BTF run), with
/// BTF: the same exact answers as the raw ones above, IPv4 and IPv6.
#[test]
fn classic_tracepoints_report_the_same_as_raw_ones() {
    let classic = || ProbeConfig {
        raw_tracepoints: false,
        ..ProbeConfig::default()
    };
    known_traffic_with("127.0.0.1", "127.0.0.1", classic());
    known_traffic_with("::1", "::1", classic());
}

/// The untyped raw-tracepoint programs (what kernels that refuse BTF-typed tracepoints run):
/// the same exact answers as the typed ones the default attaches, IPv4 and IPv6.
#[test]
fn untyped_raw_tracepoints_report_the_same_as_typed_ones() {
    let untyped = || ProbeConfig {
        typed_tracepoints: false,
        ..ProbeConfig::default()
    };
    known_traffic_with("127.0.0.1", "127.0.0.1", untyped());
    known_traffic_with("::1", "::1", untyped());
}

#[test]
fn refused_and_reset_connections_carry_their_outcome() {
    let probe = RunningProbe::start(ProbeConfig::default());
    // Refused: nobody listens on a port we just released.
    let closed_port = support::free_port();
    let client = Traffic::spawn(
        None,
        &[
            "client",
            "127.0.0.1",
            &closed_port.to_string(),
            "1",
            "10",
            "10",
        ],
    );
    let cpid = client.pid();
    assert!(client.finish().contains(&"refused".to_owned()));
    let events = probe.wait_events(closed_port, WAIT, "the refused close", |e| {
        closes_by(e, cpid) == 1
    });
    let refused = of_kind(&events, EventKind::Close, cpid)[0];
    assert_eq!(refused.close_reason, CloseReason::Refused, "{refused:#?}");
    assert_eq!(refused.direction, Direction::Active);
    assert_eq!(&*refused.comm, "ew-client");
    assert_eq!(
        of_kind(&events, EventKind::Open, cpid).len(),
        0,
        "{events:#?}"
    );

    // Reset: the server closes with SO_LINGER 0 after reading the request.
    let mut server = Traffic::spawn(None, &["server", "127.0.0.1", "1", "100", "0", "reset"]);
    let port = server.port();
    let client = Traffic::spawn(
        None,
        &["client", "127.0.0.1", &port.to_string(), "1", "100", "10"],
    );
    let (spid, cpid) = (server.pid(), client.pid());
    assert!(client.finish().contains(&"reset".to_owned()));
    server.finish();
    let events = probe.wait_events(port, WAIT, "both reset closes", |e| {
        closes_by(e, cpid) == 1 && closes_by(e, spid) == 1
    });
    let c = of_kind(&events, EventKind::Close, cpid)[0];
    let s = of_kind(&events, EventKind::Close, spid)[0];
    assert_eq!(c.close_reason, CloseReason::Reset, "client {c:#?}");
    assert_eq!(s.close_reason, CloseReason::Reset, "server {s:#?}");
    assert!(c.close_reason.is_error());
    assert_eq!(s.bytes_received, 100, "{s:#?}");
}

#[test]
fn connections_in_another_network_namespace_are_attributed_to_it() {
    let probe = RunningProbe::start(ProbeConfig::default());
    let ns = NetNs::new("attr");
    let mut server = Traffic::spawn(
        Some(&ns),
        &["server", "127.0.0.1", "2", "10", "10", "normal"],
    );
    let port = server.port();
    let client = Traffic::spawn(
        Some(&ns),
        &["client", "127.0.0.1", &port.to_string(), "2", "10", "10"],
    );
    let (spid, cpid) = (server.pid(), client.pid());
    client.finish();
    server.finish();
    let events = probe.wait_events(port, WAIT, "closes in the namespace", |e| {
        closes_by(e, cpid) == 2 && closes_by(e, spid) == 2
    });
    let inode = ns.inode();
    assert_ne!(inode, host_netns());
    for e in events.iter().filter(|e| e.tgid == cpid || e.tgid == spid) {
        assert_eq!(e.netns, inode, "{e:#?}");
    }
}

#[test]
fn retransmits_are_counted_on_a_lossy_path_and_not_on_a_clean_one() {
    let probe = RunningProbe::start(ProbeConfig::default());
    let net = VethPair::new("rt");
    // veth carries GSO super-packets of up to 64 KB, so the transfer is a few dozen packets
    // to the filter: 2 MB with a quarter dropped makes "no loss at all" a 1-in-10,000 event.
    const BYTES: &str = "2000000";
    // The clean transfer is small: on a loaded machine a long transfer can see a tail-loss
    // probe fire (ACK processing delayed past 10 ms), which the kernel counts as a
    // retransmit although nothing was lost.
    const CLEAN_BYTES: &str = "64000";
    let mut lossy = Traffic::spawn(
        Some(&net.b),
        &["server", &net.addr_b, "1", BYTES, "10", "normal"],
    );
    let mut clean = Traffic::spawn(
        Some(&net.b),
        &["server", &net.addr_b, "1", CLEAN_BYTES, "10", "normal"],
    );
    let (lossy_port, clean_port) = (lossy.port(), clean.port());
    // Drop 25 % of the packets that reach the lossy server (nftables: no netem here).
    net.b.exec(&["nft", "add", "table", "inet", "ewloss"]);
    net.b.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "ewloss",
        "input",
        "{ type filter hook input priority 0; policy accept; }",
    ]);
    net.b.exec(&[
        "nft",
        "add",
        "rule",
        "inet",
        "ewloss",
        "input",
        "tcp",
        "dport",
        &lossy_port.to_string(),
        "numgen",
        "random",
        "mod",
        "4",
        "0",
        "drop",
    ]);
    let mut pids = Vec::new();
    for (port, bytes) in [(lossy_port, BYTES), (clean_port, CLEAN_BYTES)] {
        let client = Traffic::spawn(
            Some(&net.a),
            &["client", &net.addr_b, &port.to_string(), "1", bytes, "10"],
        );
        pids.push(client.pid());
        client.finish();
    }
    lossy.finish();
    clean.finish();
    let mut retrans = Vec::new();
    for ((port, bytes), pid) in [(lossy_port, 2_000_000), (clean_port, 64_000)]
        .into_iter()
        .zip(&pids)
    {
        let events = probe.wait_events(port, WAIT, "the client close", |e| closes_by(e, *pid) == 1);
        let c = of_kind(&events, EventKind::Close, *pid)[0].clone();
        assert_eq!(c.bytes_sent, bytes, "{c:#?}");
        assert_eq!(c.netns, net.a.inode(), "{c:#?}");
        retrans.push(c.retransmits);
    }
    assert!(retrans[0] > 0, "lossy connection: {retrans:?}");
    assert_eq!(retrans[1], 0, "clean connection: {retrans:?}");
}

/// `rtt:SRTT/RTTVAR` (milliseconds) of the established socket connected to peer port `port`.
fn ss_rtt(port: u16) -> (f64, f64) {
    let out = support::probe::run(
        "ss",
        &[
            "-tinH",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{port}"),
        ],
    );
    let field = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rtt:"))
        .unwrap_or_else(|| panic!("no rtt in ss output: {out}"));
    let (srtt, var) = field.split_once('/').expect("rtt:a/b");
    (srtt.parse().unwrap(), var.parse().unwrap())
}

#[test]
fn rtt_of_a_live_connection_agrees_with_ss() {
    let probe = RunningProbe::start(ProbeConfig {
        update_interval: Duration::from_millis(200),
        ..ProbeConfig::default()
    });
    let mut echo = Traffic::spawn(None, &["echo", "127.0.0.1"]);
    let port = echo.port();
    let mut pinger = Traffic::spawn(None, &["pinger", "127.0.0.1", &port.to_string()]);
    assert_eq!(pinger.line(), "idle");
    // Let delayed ACKs settle: the client's srtt stays put while nothing is in flight, and
    // the sweep keeps writing updates of the idle connection.
    std::thread::sleep(Duration::from_millis(400));
    let (srtt_ms, var_ms) = ss_rtt(port);
    let asked = unix_now();
    let ppid = pinger.pid();
    let is_update = |e: &ConnectionEvent| {
        e.kind == EventKind::Update && e.tgid == ppid && e.end_unix_nanos >= asked
    };
    let events = probe.wait_events(port, WAIT, "an update of the idle connection", |e| {
        e.iter().any(is_update)
    });
    let update = events.iter().find(|e| is_update(e)).unwrap();
    assert_eq!(update.close_reason, CloseReason::Open);
    assert_eq!(update.direction, Direction::Active);
    assert_eq!(
        (update.bytes_sent, update.bytes_received),
        (20 * 4, 20 * 4),
        "{update:#?}"
    );
    let ours = (
        update.srtt_us as f64 / 1000.0,
        update.rttvar_us as f64 / 1000.0,
    );
    assert!(
        (ours.0 - srtt_ms).abs() <= 0.0015 && (ours.1 - var_ms).abs() <= 0.0015,
        "probe rtt {ours:?} ms vs ss {:?} ms: {update:#?}",
        (srtt_ms, var_ms)
    );
    // Its open came first, once, with the same connection id.
    let opens = of_kind(&events, EventKind::Open, ppid);
    assert_eq!(opens.len(), 1, "{events:#?}");
    assert_eq!(opens[0].conn_id, update.conn_id);
    let first = |kind| events.iter().position(|e| e.kind == kind && e.tgid == ppid);
    assert!(
        first(EventKind::Open) < first(EventKind::Update),
        "{events:#?}"
    );
    pinger.send_line("poke");
    assert_eq!(pinger.line(), "done");
    pinger.send_line("bye");
    pinger.finish();
    drop(echo);
}

#[test]
fn passive_opens_on_a_listener_older_than_the_probe_carry_its_owner() {
    // The server listens before the probe starts: the probe finds the listener in /proc.
    let mut echo = Traffic::spawn(None, &["echo", "127.0.0.1"]);
    let port = echo.port();
    let probe = RunningProbe::start(ProbeConfig {
        update_interval: Duration::from_millis(200),
        ..ProbeConfig::default()
    });
    let epid = echo.pid();
    let mut pinger = Traffic::spawn(None, &["pinger", "127.0.0.1", &port.to_string()]);
    assert_eq!(pinger.line(), "idle");
    // The server end is live, has been open longer than `open_delay`, and has never been
    // closed: its open and updates come from the sweep, with the listener's owner.
    let events = probe.wait_events(port, WAIT, "the server end's open and an update", |e| {
        !of_kind(e, EventKind::Open, epid).is_empty()
            && !of_kind(e, EventKind::Update, epid).is_empty()
    });
    assert!(
        of_kind(&events, EventKind::Close, epid).is_empty(),
        "{events:#?}"
    );
    for e in of_kind(&events, EventKind::Open, epid)
        .into_iter()
        .chain(of_kind(&events, EventKind::Update, epid))
    {
        assert_eq!(e.direction, Direction::Passive, "{e:#?}");
        assert_eq!(e.local.port(), port, "{e:#?}");
        assert_eq!((e.pid, &*e.comm), (epid, "ew-echo"), "{e:#?}");
        assert!(e.cgroup_id != 0, "{e:#?}");
    }
    pinger.send_line("poke");
    assert_eq!(pinger.line(), "done");
    pinger.send_line("bye");
    pinger.finish();
    let events = probe.wait_events(port, WAIT, "the server end's close", |e| {
        closes_by(e, epid) == 1
    });
    let opens = of_kind(&events, EventKind::Open, epid);
    assert_eq!(opens.len(), 1, "{events:#?}");
    drop(echo);
}

/// A sysctl set for as long as the guard lives, then put back.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Sysctl {
        let old = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::fs::write(path, value).unwrap_or_else(|e| panic!("{path} = {value}: {e}"));
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

/// An agent restart, every way the probe can find the sockets of connections open before it:
/// - from the kernel's `held_sockets` iterator, which gives their addresses even where
///   `/proc/net/tcp` hides them (`kernel.kptr_restrict` 2), in another network namespace;
/// - from /proc alone (`socket_iterator = false`): their addresses where `/proc/net/tcp` shows
///   them (`kptr_restrict` 1 with `CAP_SYSLOG`, which root has); where it does not (2), by a
///   lookup of their addresses in their network namespace: the agent's own, and another one
///   that it enters; without reports (no sweep), no lookup: held by their addresses, for an
///   open and a close.
///
/// One test, as the setting is global; it is put back as soon as the probe has started.
#[test]
fn connections_open_before_the_probe_are_reported_once_per_end() {
    let updates = ProbeConfig {
        update_interval: Duration::from_millis(200),
        ..ProbeConfig::default()
    };
    let proc_only = ProbeConfig {
        socket_iterator: false,
        ..updates.clone()
    };
    let v4 = ("127.0.0.1", "127.0.0.1");
    let ns = NetNs::new("adopt");
    connections_open_before_the_probe("2", Some(&ns), ("::1", "::1"), &updates);
    connections_open_before_the_probe("1", None, v4, &proc_only);
    // The server end a dual-stack socket: IPv6, with v4-mapped addresses.
    connections_open_before_the_probe("2", None, ("::", "127.0.0.1"), &proc_only);
    connections_open_before_the_probe("2", Some(&ns), ("::1", "::1"), &proc_only);
    let no_sweep = ProbeConfig {
        update_interval: Duration::ZERO,
        open_delay: Duration::ZERO,
        ..proc_only
    };
    connections_open_before_the_probe("2", None, v4, &no_sweep);
}

/// The address the server listens on and the one the client connects to.
fn connections_open_before_the_probe(
    kptr_restrict: &str,
    netns: Option<&NetNs>,
    (listen, connect): (&str, &str),
    config: &ProbeConfig,
) {
    let updates = !config.update_interval.is_zero();
    let netns_inode = netns.map_or_else(host_netns, NetNs::inode);
    // Both ends open, and 84 bytes each way, before the probe starts (an agent restart).
    let mut echo = Traffic::spawn(netns, &["echo", listen]);
    let port = echo.port();
    let mut pinger = Traffic::spawn(netns, &["pinger", connect, &port.to_string()]);
    assert_eq!(pinger.line(), "idle");
    let (epid, ppid) = (echo.pid(), pinger.pid());
    let before = unix_now();
    let probe = {
        let _setting = Sysctl::set("/proc/sys/kernel/kptr_restrict", kptr_restrict);
        RunningProbe::start(config.clone())
    };
    let after = unix_now();
    let case = format!(
        "kptr_restrict {kptr_restrict}, netns {netns_inode}, {listen} <- {connect}, updates {updates}"
    );
    // Announced at once; with the socket found, updated like any connection.
    let events = probe.wait_events(port, WAIT, "opens (and updates) of both ends", |e| {
        [epid, ppid].iter().all(|&pid| {
            !of_kind(e, EventKind::Open, pid).is_empty()
                && (!updates || !of_kind(e, EventKind::Update, pid).is_empty())
        })
    });
    if updates {
        // The kernel's counters, from the connection's real start: 20 pings each way.
        for pid in [epid, ppid] {
            let update = of_kind(&events, EventKind::Update, pid)[0];
            assert_eq!(
                (update.bytes_sent, update.bytes_received),
                (80, 80),
                "{case}: {update:#?}"
            );
            assert!(update.srtt_us > 0, "{case}: {update:#?}");
        }
    } else {
        // Without a sweep nothing asks the kernel for reports.
        std::thread::sleep(Duration::from_millis(600));
        let events = probe.events_on_port(port);
        for pid in [epid, ppid] {
            assert!(
                of_kind(&events, EventKind::Update, pid).is_empty(),
                "{case}: {events:#?}"
            );
        }
    }
    for e in probe.events_on_port(port) {
        assert!(e.started_before_probe, "{e:#?}");
        assert_ne!(e.kind, EventKind::Close, "{e:#?}");
    }
    pinger.send_line("poke");
    assert_eq!(pinger.line(), "done");
    pinger.send_line("bye");
    pinger.finish();
    probe.wait_events(port, WAIT, "the closes of both ends", |e| {
        closes_by(e, epid) == 1 && closes_by(e, ppid) == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    let events = probe.events_on_port(port);
    for (pid, comm, direction, local_port) in [
        (ppid, "ew-pinger", Direction::Active, None),
        (epid, "ew-echo", Direction::Passive, Some(port)),
    ] {
        let opens = of_kind(&events, EventKind::Open, pid);
        let closes = of_kind(&events, EventKind::Close, pid);
        assert_eq!(
            (opens.len(), closes.len()),
            (1, 1),
            "{case}: pid {pid}: {events:#?}"
        );
        let (open, close) = (opens[0], closes[0]);
        assert_eq!(open.conn_id, close.conn_id);
        for e in [open, close] {
            assert!(e.started_before_probe, "{e:#?}");
            assert_eq!(e.direction, direction, "{e:#?}");
            assert_eq!((&*e.comm, e.pid), (comm, pid), "{e:#?}");
            assert!(e.cgroup_id != 0, "{e:#?}");
            assert_eq!(e.netns, netns_inode, "{case}: {e:#?}");
            assert_eq!(e.local.ip().to_string(), connect, "{case}: {e:#?}");
            if let Some(p) = local_port {
                assert_eq!(e.local.port(), p, "{e:#?}");
            } else {
                assert_eq!(e.peer.port(), port, "{e:#?}");
            }
            // Its start is when the probe found it.
            assert!(
                (before..=after).contains(&e.start_unix_nanos),
                "start {} outside the probe's start {before}..{after}: {e:#?}",
                e.start_unix_nanos
            );
        }
        // 21 pings and their echoes, counted from the connection's real start.
        assert_eq!(
            (close.bytes_sent, close.bytes_received),
            (84, 84),
            "{close:#?}"
        );
        assert_eq!(close.close_reason, CloseReason::Normal, "{close:#?}");
    }
    drop(echo);
}

#[test]
fn an_idle_connection_is_announced_before_it_closes_and_only_once() {
    // The default `open_delay` (1 s): the kernel writes no open record for a connection that
    // does nothing after its handshake; the agent's sweep of the connection map finds it.
    let probe = RunningProbe::start(ProbeConfig::default());
    assert_eq!(ProbeConfig::default().open_delay, Duration::from_secs(1));
    let mut echo = Traffic::spawn(None, &["echo", "127.0.0.1"]);
    let port = echo.port();
    let mut pinger = Traffic::spawn(None, &["pinger", "127.0.0.1", &port.to_string()]);
    assert_eq!(pinger.line(), "idle");
    let ppid = pinger.pid();
    let events = probe.wait_events(port, WAIT, "the idle connection's open", |e| {
        !of_kind(e, EventKind::Open, ppid).is_empty()
    });
    assert!(
        of_kind(&events, EventKind::Close, ppid).is_empty(),
        "{events:#?}"
    );
    let open = of_kind(&events, EventKind::Open, ppid)[0].clone();
    assert_eq!(open.direction, Direction::Active, "{open:#?}");
    assert_eq!(open.peer.port(), port, "{open:#?}");
    assert_eq!(&*open.comm, "ew-pinger", "{open:#?}");
    // Traffic after the delay and the close add no second open.
    pinger.send_line("poke");
    assert_eq!(pinger.line(), "done");
    pinger.send_line("bye");
    pinger.finish();
    probe.wait_events(port, WAIT, "the idle connection's close", |e| {
        !of_kind(e, EventKind::Close, ppid).is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    let events = probe.events_on_port(port);
    let opens = of_kind(&events, EventKind::Open, ppid);
    assert_eq!(opens.len(), 1, "{events:#?}");
    assert_eq!(
        opens[0].conn_id,
        of_kind(&events, EventKind::Close, ppid)[0].conn_id
    );
    drop(echo);
}

#[test]
fn without_btf_the_probe_loads_with_tracepoint_fields_and_says_what_is_missing() {
    let probe = RunningProbe::start(ProbeConfig {
        btf_path: "/nonexistent/vmlinux".into(),
        ..ProbeConfig::default()
    });
    let status = probe.status.snapshot().probe;
    assert_eq!(status.state, edgeward::status::ProbeState::Degraded);
    let reason = status.reason.clone().unwrap_or_default();
    assert!(reason.contains("/nonexistent/vmlinux"), "{reason}");
    for field in ["bytes_sent", "srtt_us", "netns"] {
        assert!(
            status.missing_fields.iter().any(|f| f == field),
            "{field} not in {:?}",
            status.missing_fields
        );
    }
    let mut server = Traffic::spawn(None, &["server", "127.0.0.1", "1", "10", "20", "normal"]);
    let port = server.port();
    let client = Traffic::spawn(
        None,
        &["client", "127.0.0.1", &port.to_string(), "1", "10", "20"],
    );
    let (spid, cpid) = (server.pid(), client.pid());
    client.finish();
    server.finish();
    let events = probe.wait_events(port, WAIT, "closes", |e| {
        closes_by(e, cpid) == 1 && closes_by(e, spid) == 1
    });
    let c = of_kind(&events, EventKind::Close, cpid)[0];
    assert_eq!(c.peer.port(), port);
    assert_eq!(&*c.comm, "ew-client");
    assert_eq!((c.bytes_sent, c.srtt_us, c.netns), (0, 0, 0), "{c:#?}");
    assert!(c.duration_nanos() > 0);
    let s = of_kind(&events, EventKind::Close, spid)[0];
    assert_eq!(
        &*s.comm, "ew-server",
        "attributed when it closed the connection: {s:#?}"
    );
}

#[test]
fn invalid_probe_config_names_the_key() {
    for (toml, key) in [
        (
            "[probe]\nring_buffer_bytes = 5000\n",
            "probe.ring_buffer_bytes",
        ),
        ("[probe]\nmax_connections = 1\n", "probe.max_connections"),
        (
            "[probe]\nupdate_interval = \"1ms\"\n",
            "probe.update_interval",
        ),
        ("[probe]\nchannel_capacity = 0\n", "probe.channel_capacity"),
        (
            "[probe]\nenrichment_cache_size = 0\n",
            "probe.enrichment_cache_size",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgeward.toml");
        std::fs::write(&path, toml).unwrap();
        let (code, _, stderr) = support::edgeward(&["run", "--config", path.to_str().unwrap()]);
        assert_ne!(code, 0, "{toml}");
        assert!(stderr.contains(key), "{toml}: {stderr}");
    }
}

#[test]
fn agent_exports_probe_counters_in_status_and_metrics() {
    let agent = support::Agent::spawn(&[]);
    agent.wait_ready(Duration::from_secs(20));
    let mut server = Traffic::spawn(None, &["server", "127.0.0.1", "3", "10", "10", "normal"]);
    let port = server.port();
    Traffic::spawn(
        None,
        &["client", "127.0.0.1", &port.to_string(), "3", "10", "10"],
    )
    .finish();
    server.finish();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let status = agent.status();
        // 3 connections = 12 events at least (an open and a close per end), published each
        // second.
        if status["probe"]["events"].as_u64().unwrap_or(0) >= 12 {
            break status;
        }
        assert!(Instant::now() < deadline, "{status}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["probe"]["state"], "running", "{status}");
    assert!(status["probe"]["drops"].is_u64(), "{status}");
    assert!(
        status["probe"]["drop_reasons"]["ring_buffer_full"].is_u64(),
        "{status}"
    );
    let (_, metrics) = agent.get("/metrics");
    for name in [
        "edgeward_probe_events_total",
        "edgeward_probe_drops_total{reason=\"ring_buffer_full\"}",
        "edgeward_probe_drops_total{reason=\"output_channel_full\"}",
        "edgeward_probe_tcp_state_changes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}

#[test]
fn without_privileges_the_agent_runs_with_the_probe_degraded() {
    // Root without any capability: BPF is refused, everything else works.
    let (_agent, status) = agent_under_setpriv(&["--bounding-set=-all", "--inh-caps=-all"], &[]);
    assert_eq!(status["probe"]["state"], "degraded", "{status}");
    let reason = status["probe"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("Operation not permitted") || reason.contains("permission"),
        "{reason}"
    );
}

/// An agent run by `setpriv ARGS`, and its `/status` once its probe is no longer starting.
fn agent_under_setpriv(args: &[&str], agent_args: &[&str]) -> (Agent, serde_json::Value) {
    let prefix: Vec<&str> = ["setpriv"]
        .into_iter()
        .chain(args.iter().copied())
        .chain(["--"])
        .collect();
    agent_under(&prefix, agent_args)
}

/// An agent started through the command `prefix`, once its probe is past starting.
fn agent_under(prefix: &[&str], agent_args: &[&str]) -> (Agent, serde_json::Value) {
    let agent = Agent::spawn_under(prefix, agent_args);
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = agent.get("/status");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        if status["probe"]["state"] != "starting" {
            return (agent, status);
        }
        assert!(
            Instant::now() < deadline,
            "the probe is still starting: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The capability set the DaemonSet and the systemd unit grant (docs/operators.md): the probe
/// runs and traces. The executable link of a process with more capabilities than the agent
/// (as this test's own are) is refused: its spans carry the process's name, not the name of
/// the thread that made the connection. Connections open before the agent are found by the
/// kernel's list of held sockets, which needs no `ptrace` access (`/proc/PID/fd` would): in
/// its own network namespace and in another one (a pod's), with their owner and container,
/// and reported with their bytes counted from their real start. The agent runs in a cgroup
/// namespace of its own, as in a pod: /proc/PID/cgroup then gives it paths relative to its
/// own cgroup, and only the kernel's list names the holders' cgroups.
#[test]
fn with_only_the_shipped_capabilities_the_probe_runs_and_finds_what_was_open_before() {
    let sink = support::otlp::BlockingSink::start(Default::default());
    let endpoint = sink.get().grpc_endpoint();
    let mut echo = Traffic::spawn(None, &["echo", "127.0.0.1"]);
    let port = echo.port();
    // Open before the agent starts, here and in a namespace of their own, by processes in a
    // pod's container cgroup; 20 pings each.
    let tag = std::process::id() + 1;
    let (pod, pod_uid, container) = support::probe::pod_container(tag, "burstable");
    let ns = NetNs::new("shipped");
    let old: Vec<(Traffic, Traffic, u16)> = [None, Some(&ns)]
        .into_iter()
        .map(|netns| {
            let mut echo = Traffic::spawn(netns, &["echo", "127.0.0.1"]);
            let port = echo.port();
            let mut pinger = Traffic::spawn(netns, &["pinger", "127.0.0.1", &port.to_string()]);
            assert_eq!(pinger.line(), "idle");
            pod.add(echo.pid());
            pod.add(pinger.pid());
            (echo, pinger, port)
        })
        .collect();
    // The agent in a cgroup of its own, then in a cgroup namespace rooted there.
    let own = support::probe::Cgroup::new(&[format!("ew-{tag}-agent")]);
    let enter = format!(
        "echo $$ > {}/cgroup.procs && exec unshare --cgroup setpriv {} -- \"$0\" \"$@\"",
        own.path().display(),
        support::probe::shipped_setpriv(),
    );
    let (agent, status) = agent_under(&["sh", "-c", &enter], &["--otlp-endpoint", &endpoint]);
    let events = || -> u64 {
        let (_, metrics) = agent.get("/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("edgeward_probe_events_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = events();
    let mut pinger = Traffic::spawn(None, &["pinger", "127.0.0.1", &port.to_string(), "thread"]);
    assert_eq!(pinger.line(), "idle");
    pinger.send_line("poke");
    assert_eq!(pinger.line(), "done");
    // Closes the connection; the process lives on until `finish`, so that what the agent
    // reads of it in /proc does not depend on how soon it reads.
    pinger.send_line("close");
    let deadline = Instant::now() + WAIT;
    while events() <= before {
        assert!(
            Instant::now() < deadline,
            "no probe records with the shipped capabilities ({})",
            support::probe::shipped_setpriv()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(echo);
    assert_eq!(status["probe"]["state"], "running", "{status}");
    let missing = status["probe"]["missing_fields"].to_string();
    assert!(!missing.contains("CAP_SYS_PTRACE"), "{status}");
    assert!(!missing.contains("open before the probe"), "{status}");
    let log = agent.log();
    assert!(log.contains("kernel iterator"), "{log}");
    // The pinger's connection was made by its thread "ew-pinger"; the process is "ew-main".
    let pid = i64::from(pinger.pid());
    let spans = sink.wait_for_spans(1, WAIT, |s| {
        s.attr("process.pid") == Some(&Value::Int(pid)) && s.kind == SpanKind::Client
    });
    pinger.finish();
    assert_eq!(
        spans[0].attr("process.executable.name"),
        Some(&Value::Str("ew-main".into())),
        "{}",
        spans[0].to_line()
    );
    for (old_echo, mut old_pinger, old_port) in old {
        old_pinger.send_line("poke");
        assert_eq!(old_pinger.line(), "done");
        old_pinger.send_line("bye");
        let old_pid = old_pinger.pid();
        old_pinger.finish();
        for (pid, kind, name) in [
            (old_pid, SpanKind::Client, "ew-pinger"),
            (old_echo.pid(), SpanKind::Server, "ew-echo"),
        ] {
            let pid = i64::from(pid);
            let spans = sink.wait_for_spans(1, WAIT, |s| {
                s.attr("process.pid") == Some(&Value::Int(pid)) && s.kind == kind
            });
            let span = &spans[0];
            let line = span.to_line();
            assert_eq!(
                span.attr("process.executable.name"),
                Some(&Value::Str(name.into())),
                "{line}"
            );
            assert_eq!(
                span.attr("container.id"),
                Some(&Value::Str(container.clone())),
                "{line}"
            );
            assert_eq!(
                span.attr("k8s.pod.uid"),
                Some(&Value::Str(pod_uid.clone())),
                "{line}"
            );
            assert_eq!(
                span.attr("edgeward.tcp.started_before_probe"),
                Some(&Value::Bool(true)),
                "{line}"
            );
            let server_port = if kind == SpanKind::Client {
                "network.peer.port"
            } else {
                "network.local.port"
            };
            assert_eq!(
                span.attr(server_port),
                Some(&Value::Int(old_port.into())),
                "{line}"
            );
            // 21 pings and their echoes, counted by the kernel from the connection's start.
            for key in ["edgeward.tcp.bytes_sent", "edgeward.tcp.bytes_received"] {
                assert_eq!(span.attr(key), Some(&Value::Int(84)), "{key}: {line}");
            }
        }
        drop(old_echo);
    }
}

#[test]
fn connections_are_enriched_with_executable_container_and_pod_from_cgroupfs() {
    let probe = RunningProbe::start(ProbeConfig::default());
    let (cgroup, pod_uid, container) =
        support::probe::pod_container(std::process::id(), "besteffort");
    // Into the workload's cgroup before it listens, as a container runtime starts it: the
    // owner of its passive opens is recorded at `listen()`.
    let mut echo = Traffic::spawn(None, &["echo", "127.0.0.1", "wait"]);
    let epid = echo.pid();
    cgroup.add(epid);
    echo.send_line("listen");
    let port = echo.port();
    let mut pinger = Traffic::spawn(None, &["pinger", "127.0.0.1", &port.to_string()]);
    assert_eq!(pinger.line(), "idle");
    pinger.send_line("poke");
    assert_eq!(pinger.line(), "done");
    let events = probe.wait_events(port, WAIT, "the echo server's open", |e| {
        !of_kind(e, EventKind::Open, epid).is_empty()
    });
    let open = of_kind(&events, EventKind::Open, epid)[0];
    assert_eq!(
        open.container_id.as_deref(),
        Some(container.as_str()),
        "{open:#?}"
    );
    assert_eq!(open.pod_uid.as_deref(), Some(pod_uid.as_str()), "{open:#?}");
    let exe = open.executable.as_deref().unwrap_or_default();
    assert!(exe.starts_with("python"), "{open:#?}");
    // The client is in the host's root cgroup: no container, no pod.
    let pinger_pid = pinger.pid();
    let client = events
        .iter()
        .find(|e| e.tgid == pinger_pid)
        .expect("the pinger's events");
    assert_eq!(
        (client.container_id.as_deref(), client.pod_uid.as_deref()),
        (None, None)
    );
    pinger.send_line("bye");
    pinger.finish();
    drop(echo);
}

#[test]
fn a_full_output_channel_drops_and_counts_without_blocking_the_reader() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let status = edgeward::status::StatusHandle::new("full-channel");
    let mut probe = {
        let _guard = rt.enter();
        ProbeConfig {
            channel_capacity: 2,
            ..ProbeConfig::default()
        }
        .start(&status)
        .unwrap_or_else(|e| panic!("loading the eBPF probe failed (needs root and BPF): {e}"))
    };
    // The kernel's count of skipped runs (`nested_run_skipped`) is readable for every program
    // the probe loaded: a failure here would leave that loss uncounted.
    probe
        .nested_runs_skipped()
        .expect("reading recursion_misses of the probe's programs");
    // Held but never read: the consumer is stuck.
    let _events = probe.take_events().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = rt.spawn(probe.run(shutdown.clone()));
    let mut server = Traffic::spawn(None, &["server", "127.0.0.1", "10", "10", "10", "normal"]);
    let port = server.port();
    Traffic::spawn(
        None,
        &["client", "127.0.0.1", &port.to_string(), "10", "10", "10"],
    )
    .finish();
    server.finish();
    // 10 connections = 40 ring records at least (a connect, an accept and two closes each);
    // the reader keeps reading them all. Each of the 20 closes becomes two events (its open
    // and its close) and meets channels that hold two items each, the second never emptied:
    // it is dropped at the reader's channel (counted once, as a record) or its two events at
    // the output (counted twice), except the one or two events that fill the output channel.
    // So every event but two is accounted for: 2 × reader drops + output drops >= 38 (other
    // connections on the machine only add to both).
    let deadline = Instant::now() + WAIT;
    let drops = |p: &edgeward::status::ProbeStatus, reason: &str| {
        p.drop_reasons.get(reason).copied().unwrap_or(0)
    };
    let probe_status = loop {
        let p = status.snapshot().probe;
        let lost_events = 2 * drops(&p, "reader_channel_full") + drops(&p, "output_channel_full");
        if p.events >= 40 && lost_events >= 38 {
            break p;
        }
        assert!(Instant::now() < deadline, "{p:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Every record was read from the ring buffer (none lost there), and the stuck consumer's
    // channel is where events were dropped.
    assert_eq!(
        drops(&probe_status, "ring_buffer_full"),
        0,
        "{probe_status:?}"
    );
    assert!(
        drops(&probe_status, "output_channel_full") >= 1,
        "{probe_status:?}"
    );
    shutdown.cancel();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await })
        .expect("the probe stops even with a stuck consumer")
        .unwrap();
}
