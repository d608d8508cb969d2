//! End to end: a real etcd, the agent with its eBPF probe, two plugins published through the
//! CLI, known TCP traffic made by this process, and a real OTLP receiver. The receiver must get
//! exactly the expected spans (with the tagger's attribute, without the connections the
//! allowlist drops) and the expected metric values.

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use edgeward_otlp_sink::{ReceivedSpan, SinkOptions, Value};
use support::{Agent, Etcd, EtcdVersion, edgeward, otlp::BlockingSink, plugins};

const REQUEST: usize = 3000;
const RESPONSE: usize = 7000;

/// Serves `count` connections on `listener`: reads REQUEST bytes, answers RESPONSE bytes.
fn serve(listener: TcpListener, count: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for _ in 0..count {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut request = vec![0u8; REQUEST];
            conn.read_exact(&mut request).expect("read request");
            conn.write_all(&vec![b'r'; RESPONSE])
                .expect("write response");
            // Wait for the client to close first, so this side sees an orderly close.
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest);
        }
    })
}

/// Makes one connection: sends REQUEST bytes, reads RESPONSE bytes, closes.
fn call(port: u16) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.write_all(&vec![b'q'; REQUEST]).expect("write request");
    let mut response = vec![0u8; RESPONSE];
    conn.read_exact(&mut response).expect("read response");
}

/// Prints the agent's log when the test fails, whatever failed.
struct LogOnFailure<'a>(&'a Agent);

impl Drop for LogOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.0.log());
        }
    }
}

fn int(span: &ReceivedSpan, key: &str) -> Option<i64> {
    span.attr(key).and_then(Value::as_i64)
}

fn text<'a>(span: &'a ReceivedSpan, key: &str) -> Option<&'a str> {
    span.attr(key).and_then(Value::as_str)
}

fn publish(etcd: &Etcd, name: &str, order: &str, config: &str) {
    let wasm = plugins::wasm_path(name);
    let (code, stdout, stderr) = edgeward(&[
        "plugin",
        "publish",
        wasm.to_str().unwrap(),
        "--name",
        name,
        "--order",
        order,
        "--config",
        config,
        "--etcd-endpoints",
        &etcd.client_url,
    ]);
    assert_eq!(code, 0, "publishing {name}: {stdout}{stderr}");
}

#[test]
fn connections_flow_from_the_kernel_through_plugins_to_the_collector() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let sink = BlockingSink::start(SinkOptions::default());
    let run = format!("e2e-{}", fastrand::u64(..));

    let kept = TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = TcpListener::bind("127.0.0.1:0").unwrap();
    let (kept_port, denied_port) = (
        kept.local_addr().unwrap().port(),
        denied.local_addr().unwrap().port(),
    );
    publish(
        &etcd,
        "allowlist",
        "10",
        &format!(r#"{{"mode": "deny", "ports": [{denied_port}]}}"#),
    );
    publish(
        &etcd,
        "tagger",
        "20",
        &format!(r#"{{"attributes": {{"edgeward.test.run": "{run}"}}}}"#),
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[otlp]\nendpoint = \"{}\"\nbatch_timeout = \"200ms\"\nmetrics_interval = \"1s\"\n\
             metric_attributes = [\"network.peer.port\", \"process.pid\"]\n",
            sink.get().grpc_endpoint()
        ),
    )
    .unwrap();
    let agent = Agent::spawn(&[
        "--config",
        config.to_str().unwrap(),
        "--etcd-endpoints",
        &etcd.client_url,
    ]);
    let _log = LogOnFailure(&agent);
    agent.wait_ready(Duration::from_secs(20));
    let status = agent.wait_status(Duration::from_secs(60), "both plugins active", |s| {
        s["plugins"]
            .as_array()
            .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["state"] == "active"))
    });
    assert_eq!(status["probe"]["state"], "running", "{status}");

    const KEPT: usize = 6;
    const DENIED: usize = 4;
    let servers = [serve(kept, KEPT), serve(denied, DENIED)];
    for _ in 0..KEPT {
        call(kept_port);
    }
    for _ in 0..DENIED {
        call(denied_port);
    }
    for s in servers {
        s.join().unwrap();
    }
    let pid = i64::from(std::process::id());

    // Client spans to the kept port, server spans on both ports (the allowlist looks at the
    // peer port, which on the server side is the client's ephemeral port).
    let ours = |s: &ReceivedSpan| text(s, "edgeward.test.run") == Some(run.as_str());
    let client_kept = |s: &ReceivedSpan| {
        ours(s)
            && format!("{:?}", s.kind).contains("Client")
            && int(s, "network.peer.port") == Some(i64::from(kept_port))
    };
    let server_on = |port: u16| {
        move |s: &ReceivedSpan| {
            format!("{:?}", s.kind).contains("Server")
                && int(s, "network.local.port") == Some(i64::from(port))
        }
    };
    let spans = sink.wait_for_spans(KEPT, Duration::from_secs(30), client_kept);
    sink.wait_for_spans(KEPT, Duration::from_secs(30), server_on(kept_port));
    sink.wait_for_spans(DENIED, Duration::from_secs(30), server_on(denied_port));
    // Everything the probe saw of this traffic has been exported by now; let one more batch
    // pass, then check that nothing extra or dropped arrived.
    std::thread::sleep(Duration::from_secs(1));
    let all = sink.get().spans();
    assert_eq!(
        all.iter().filter(|s| client_kept(s)).count(),
        KEPT,
        "each connection once"
    );
    assert_eq!(
        all.iter()
            .filter(|s| int(s, "network.peer.port") == Some(i64::from(denied_port)))
            .count(),
        0,
        "the allowlist dropped the connections to {denied_port}"
    );
    assert!(
        all.iter().filter(|s| server_on(kept_port)(s)).all(ours),
        "the tagger tagged the server side too"
    );

    for span in &spans {
        assert_eq!(text(span, "network.transport"), Some("tcp"), "{span:?}");
        assert_eq!(text(span, "network.type"), Some("ipv4"), "{span:?}");
        assert_eq!(text(span, "network.peer.address"), Some("127.0.0.1"));
        assert_eq!(text(span, "network.local.address"), Some("127.0.0.1"));
        assert_eq!(int(span, "process.pid"), Some(pid), "{span:?}");
        assert_eq!(
            int(span, "edgeward.tcp.bytes_sent"),
            Some(REQUEST as i64),
            "{span:?}"
        );
        assert_eq!(
            int(span, "edgeward.tcp.bytes_received"),
            Some(RESPONSE as i64),
            "{span:?}"
        );
        assert_eq!(
            text(span, "edgeward.tcp.close_reason"),
            Some("normal"),
            "{span:?}"
        );
        assert!(span.end_unix_nanos >= span.start_unix_nanos);
        assert!(span.end_unix_nanos - span.start_unix_nanos < 10_000_000_000);
        assert!(span.resource.contains_key("host.name"), "{span:?}");
        assert_eq!(
            span.resource.get("service.name").and_then(Value::as_str),
            Some("edgeward")
        );
    }

    // Metrics: this process's connections to the kept port, counted exactly once; none to
    // the denied port.
    let closed = sink.wait_for_metric(
        "edgeward.tcp.connections.closed",
        Duration::from_secs(30),
        |m| {
            m.point(&[
                ("network.peer.port", Value::Int(i64::from(kept_port))),
                ("process.pid", Value::Int(pid)),
            ])
            .is_some_and(|p| p.value as usize == KEPT)
        },
    );
    assert!(
        closed
            .point(&[("network.peer.port", Value::Int(i64::from(denied_port)))])
            .is_none(),
        "{closed:?}"
    );

    // Self-telemetry rides along: plugin calls and errors (none here), probe events.
    let errors = sink.wait_for_metric("edgeward.plugin.errors", Duration::from_secs(30), |_| true);
    assert_eq!(errors.total(), 0.0, "{errors:?}");
    sink.wait_for_metric("edgeward.probe.events", Duration::from_secs(30), |m| {
        m.total() > 0.0
    });
}

/// A long-lived connection's bytes reach the metrics while it is still open, from its update
/// events, and its close adds only what they had not counted.
#[test]
fn bytes_of_an_open_connection_are_counted_from_its_updates_and_only_once() {
    const SENT: usize = 5000;
    let sink = BlockingSink::start(SinkOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[otlp]\nendpoint = \"{}\"\nmetrics_interval = \"300ms\"\n\
             metric_attributes = [\"network.peer.port\"]\n\n\
             [probe]\nopen_delay = \"200ms\"\nupdate_interval = \"200ms\"\n",
            sink.get().grpc_endpoint()
        ),
    )
    .unwrap();
    let agent = Agent::spawn(&["--config", config.to_str().unwrap()]);
    let _log = LogOnFailure(&agent);
    let status = agent.wait_status(Duration::from_secs(30), "the probe running", |s| {
        s["probe"]["state"] != "starting"
    });
    assert_eq!(status["probe"]["state"], "running", "{status}");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read");
        got.len()
    });
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client.write_all(&[b'b'; SENT]).expect("write");
    // This process's end, by its peer's port: what the peer acknowledged, while it is open.
    let ours = [("network.peer.port", Value::Int(i64::from(port)))];
    let sent = |m: &edgeward_otlp_sink::ReceivedMetric| m.point(&ours).map(|p| p.value as usize);
    sink.wait_for_metric("edgeward.tcp.bytes_sent", Duration::from_secs(20), |m| {
        sent(m) == Some(SENT)
    });
    let closed = |m: &edgeward_otlp_sink::ReceivedMetric| m.point(&ours).is_some();
    assert!(
        sink.get()
            .metrics_named("edgeward.tcp.connections.closed")
            .iter()
            .all(|m| !closed(m)),
        "counted from a close, not an update"
    );

    drop(client);
    assert_eq!(server.join().unwrap(), SENT);
    sink.wait_for_metric(
        "edgeward.tcp.connections.closed",
        Duration::from_secs(20),
        closed,
    );
    // An export after the close's: its bytes once, not the update's and the close's.
    let exports = sink.get().metrics_named("edgeward.tcp.bytes_sent").len();
    support::wait_for(Duration::from_secs(10), "a later metrics export", || {
        (sink.get().metrics_named("edgeward.tcp.bytes_sent").len() > exports).then_some(())
    });
    let last = sink.get().metrics_named("edgeward.tcp.bytes_sent");
    assert_eq!(last.last().and_then(sent), Some(SENT), "{:?}", last.last());
}
