//! OpenTelemetry export over the network to a real OTLP receiver: recorded connection events go
//! through the real pipeline (batching, a plugin-like policy) and exporter, over gRPC and
//! HTTP/protobuf, plain and with mutual TLS, with the collector slow, down, and back.

mod support;

use std::{sync::Arc, time::Duration};

use edgeward::{
    export::{Compression, OtlpProtocol},
    probe::event::{AttrEdit, AttrValue, CloseReason, Direction, EventKind},
};
use edgeward_otlp_sink::{Failure, Value};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use support::otlp::{
    Harness, Sink, SinkOptions, TagAndDrop, TestPki, close_with_id, event, test_config,
};

const WAIT: Duration = Duration::from_secs(10);

fn s(v: &str) -> Value {
    Value::Str(v.to_owned())
}

/// The exact spans (kinds, status, attributes, edits, resource) and metric values, over each
/// transport; gzip and a bearer token from a file (re-read when it changes) on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_arrive_exactly_over_grpc_and_http() {
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::Http] {
        let sink = Sink::start().await.unwrap();
        let token_dir = tempfile::tempdir().unwrap();
        let token_file = token_dir.path().join("token");
        std::fs::write(&token_file, "first-token\n").unwrap();
        let endpoint = match protocol {
            OtlpProtocol::Grpc => sink.grpc_endpoint(),
            OtlpProtocol::Http => sink.http_endpoint(),
        };
        let mut config = test_config(&endpoint, protocol);
        config.compression = Compression::Gzip;
        config.bearer_token_file = Some(token_file.clone());
        config.headers.insert("x-tenant".into(), "edge-1".into());
        config.metric_attributes = vec!["network.peer.port".into()];
        config
            .resource
            .insert("deployment.environment".into(), "test".into());
        let h = Harness::start(config);
        h.policy.send_replace(Arc::new(TagAndDrop));

        let client_open = event(EventKind::Open, Direction::Active, "10.2.0.1:443");
        let mut client_close = client_open.clone();
        client_close.kind = EventKind::Close;
        client_close.end_unix_nanos = client_close.start_unix_nanos + 2_500_000;
        client_close.retransmits = 3;
        client_close.close_reason = CloseReason::Normal;
        // An edit made upstream (another plugin): replaced and added attributes are carried.
        client_close.edits = vec![
            AttrEdit::Set(Arc::from("team"), AttrValue::Str(Arc::from("edge"))),
            AttrEdit::Set(
                Arc::from("network.peer.address"),
                AttrValue::Str(Arc::from("redacted")),
            ),
        ];
        let mut server_reset = event(EventKind::Close, Direction::Passive, "10.3.0.7:51000");
        server_reset.close_reason = CloseReason::Reset;
        let ssh = event(EventKind::Close, Direction::Active, "10.2.0.2:22"); // dropped by policy
        h.send_all([client_open, client_close.clone(), server_reset.clone(), ssh]);

        let spans = sink.wait_for_spans(2, WAIT, |_| true).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let spans_now = sink.spans();
        assert_eq!(
            spans_now.len(),
            2,
            "{protocol:?}: exactly two spans: {spans_now:#?}"
        );
        let client = spans
            .iter()
            .find(|s| s.kind == SpanKind::Client)
            .expect("client span");
        let server = spans
            .iter()
            .find(|s| s.kind == SpanKind::Server)
            .expect("server span");

        let expected: edgeward_otlp_sink::Attributes = [
            ("network.transport", s("tcp")),
            ("network.type", s("ipv4")),
            ("network.local.address", s("10.1.0.1")),
            ("network.local.port", Value::Int(41000)),
            ("network.peer.address", s("redacted")),
            ("network.peer.port", Value::Int(443)),
            ("process.pid", Value::Int(4240)),
            ("process.executable.name", s("curl")),
            ("edgeward.tcp.bytes_sent", Value::Int(100)),
            ("edgeward.tcp.bytes_received", Value::Int(2000)),
            ("edgeward.tcp.srtt_us", Value::Int(800)),
            ("edgeward.tcp.rttvar_us", Value::Int(100)),
            ("edgeward.tcp.retransmits", Value::Int(3)),
            ("edgeward.tcp.close_reason", s("normal")),
            ("team", s("edge")),
            ("policy.checked", Value::Bool(true)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(client.attributes, expected, "{protocol:?}");
        assert!(
            client.attr("container.id").is_none(),
            "removed by the policy"
        );
        assert_eq!(client.name, "tcp connect");
        assert_eq!(client.status, StatusCode::Unset);
        assert_eq!(client.start_unix_nanos, client_close.start_unix_nanos);
        assert_eq!(client.end_unix_nanos, client_close.end_unix_nanos);
        assert_eq!(client.trace_id.len(), 16);
        assert_eq!(server.status, StatusCode::Error);
        assert_eq!(server.status_message, "reset");
        assert_eq!(server.attr("edgeward.tcp.close_reason"), Some(&s("reset")));
        assert_eq!(server.name, "tcp accept");
        for (k, v) in [
            ("service.name", "edgeward"),
            ("host.name", "test-host"),
            ("k8s.node.name", "test-node"),
            ("deployment.environment", "test"),
        ] {
            assert_eq!(client.resource.get(k), Some(&s(v)), "resource {k}");
        }
        assert_eq!(
            client.transport,
            match protocol {
                OtlpProtocol::Grpc => edgeward_otlp_sink::Transport::Grpc,
                OtlpProtocol::Http => edgeward_otlp_sink::Transport::Http,
            }
        );

        // Metrics: cumulative, by peer port; the dropped connection counts nowhere.
        let closed = sink
            .wait_for_metric("edgeward.tcp.connections.closed", WAIT, |m| {
                m.total() == 2.0
            })
            .await
            .unwrap();
        assert!(closed.monotonic);
        assert_eq!(
            closed
                .point(&[("network.peer.port", Value::Int(443))])
                .unwrap()
                .value,
            1.0
        );
        assert_eq!(
            closed
                .point(&[("network.peer.port", Value::Int(51000))])
                .unwrap()
                .value,
            1.0
        );
        let opened = sink
            .latest_metric("edgeward.tcp.connections.opened")
            .unwrap();
        assert_eq!(opened.total(), 1.0);
        let retrans = sink.latest_metric("edgeward.tcp.retransmits").unwrap();
        assert_eq!(retrans.total(), 4.0, "3 + 1");
        let sent = sink.latest_metric("edgeward.tcp.bytes_received").unwrap();
        assert_eq!(sent.total(), 4000.0);
        let rtt = sink.latest_metric("edgeward.tcp.rtt").unwrap();
        assert_eq!(rtt.unit, "s");
        let p = rtt
            .point(&[("network.peer.port", Value::Int(443))])
            .unwrap();
        assert_eq!(p.count, 1);
        assert!((p.value - 0.0008).abs() < 1e-12, "{p:?}");
        let duration = sink
            .latest_metric("edgeward.tcp.connection.duration")
            .unwrap();
        let p = duration
            .point(&[("network.peer.port", Value::Int(443))])
            .unwrap();
        assert!((p.value - 0.0025).abs() < 1e-12, "{p:?}");
        let plugin_dropped = sink
            .wait_for_metric("edgeward.pipeline.chain_dropped_events", WAIT, |m| {
                m.total() >= 1.0
            })
            .await
            .unwrap();
        assert_eq!(plugin_dropped.total(), 1.0);

        // Headers: the static one and the token; gzip was used.
        let headers = sink.request_headers();
        assert!(
            headers
                .iter()
                .all(|h| h.get("x-tenant").map(String::as_str) == Some("edge-1"))
        );
        assert!(
            headers
                .iter()
                .all(|h| h.get("authorization").map(String::as_str) == Some("Bearer first-token")),
            "{headers:?}"
        );
        let (_, _, gzip) = sink.request_counts();
        assert!(gzip >= 2, "{protocol:?}: gzip requests: {gzip}");

        // The token file changes: the next request carries the new token.
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::write(&token_file, "second-token").unwrap();
        h.send_all([close_with_id(900_001)]);
        sink.wait_for_spans(3, WAIT, |_| true).await.unwrap();
        let last = sink.request_headers();
        assert!(
            last.iter()
                .any(|h| h.get("authorization").map(String::as_str) == Some("Bearer second-token")),
            "{last:?}"
        );
        assert_eq!(h.status.snapshot().export.state, "running");
        h.shutdown().await;
        sink.stop().await;
    }
}

/// Mutual TLS with certificates made for the test; a collector whose certificate the agent
/// does not trust fails clearly, is counted, and receives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate_and_wrong_server_certificate() {
    let pki = TestPki::generate();
    let other = TestPki::generate();
    let sink = Sink::start_with(SinkOptions {
        tls: Some(pki.sink_tls()),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let mut received = 0;
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::Http] {
        let (endpoint, transport) = match protocol {
            OtlpProtocol::Grpc => (sink.grpc_endpoint(), edgeward_otlp_sink::Transport::Grpc),
            OtlpProtocol::Http => (sink.http_endpoint(), edgeward_otlp_sink::Transport::Http),
        };
        assert!(endpoint.starts_with("https://"), "{endpoint}");
        let mut config = test_config(&endpoint, protocol);
        config.tls.ca_file = Some(pki.ca_file());
        config.tls.cert_file = Some(pki.client_cert_file());
        config.tls.key_file = Some(pki.client_key_file());
        let h = Harness::start(config.clone());
        h.send_all([close_with_id(1)]);
        received += 1;
        let spans = sink.wait_for_spans(received, WAIT, |_| true).await.unwrap();
        assert_eq!(spans[received - 1].transport, transport, "{protocol:?}");
        h.shutdown().await;

        // The agent trusts another CA: the handshake fails, the reason says so, failures count.
        let mut wrong = config.clone();
        wrong.tls.ca_file = Some(other.ca_file());
        let h = Harness::start(wrong);
        h.send_all([close_with_id(2)]);
        support::wait_for(WAIT, "export to fail on the certificate", || {
            let st = h.status.snapshot().export;
            (st.state == "failing" && st.failures >= 1).then_some(st)
        });
        let st = h.status.snapshot().export;
        let reason = st.reason.clone().unwrap_or_default();
        eprintln!("{protocol:?} with an untrusted server certificate: {reason}");
        assert!(
            reason.contains("certificate") || reason.contains("UnknownIssuer"),
            "{protocol:?}: the error names the certificate problem: {reason}"
        );
        assert!(
            reason.contains(&endpoint),
            "the error names the endpoint: {reason}"
        );
        assert!(h.telemetry.failures.get() >= 1);
        assert_eq!(
            sink.span_count(),
            received,
            "nothing arrived over the untrusted connection"
        );
        h.shutdown().await;

        // Without a client certificate the collector refuses the agent.
        let mut anonymous = config;
        anonymous.tls.cert_file = None;
        anonymous.tls.key_file = None;
        let h = Harness::start(anonymous);
        h.send_all([close_with_id(3)]);
        support::wait_for(WAIT, "export without a client certificate to fail", || {
            let st = h.status.snapshot().export;
            (st.state == "failing").then_some(())
        });
        assert_eq!(sink.span_count(), received);
        h.shutdown().await;
    }
}

/// The collector is down for all of the traffic: the queue stays within its byte bound, the
/// oldest requests are dropped and counted, and when the collector comes back on the same port
/// the newest spans arrive without anyone restarting anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_bounded_queue_drops_oldest_and_recovers() {
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::Http] {
        // Reserve two ports, then free them: the collector is "down".
        let probe_sink = Sink::start().await.unwrap();
        let (grpc_addr, http_addr) = (probe_sink.grpc_addr(), probe_sink.http_addr());
        let endpoint = match protocol {
            OtlpProtocol::Grpc => probe_sink.grpc_endpoint(),
            OtlpProtocol::Http => probe_sink.http_endpoint(),
        };
        probe_sink.stop().await;

        let bound = 256 * 1024;
        let mut config = test_config(&endpoint, protocol);
        config.queue_max_bytes = bound;
        config.batch_size = 200;
        let h = Harness::start(config);
        let mut max_queue = 0;
        let total = 20_000u64;
        for chunk in 0..(total / 1000) {
            h.send_all((0..1000).map(|i| close_with_id(chunk * 1000 + i + 1)));
            // Let the pipeline take the chunk (a debug build on a busy machine is slow); the
            // channel is not what this test is about.
            support::wait_for(WAIT, "the chunk to be taken", || {
                (h.telemetry.events.get() == (chunk + 1) * 1000).then_some(())
            });
            max_queue = max_queue.max(h.telemetry.queue_bytes.get());
        }
        support::wait_for(WAIT, "every event to be taken", || {
            (h.telemetry.events.get() == total).then_some(())
        });
        max_queue = max_queue.max(h.telemetry.queue_bytes.get());
        let dropped = h.telemetry.dropped_spans.get();
        assert!(
            max_queue as usize <= bound,
            "queue {max_queue} > bound {bound}"
        );
        assert!(
            dropped > 0 && dropped < total,
            "dropped {dropped} of {total}"
        );
        // A connection attempt may take up to otlp.timeout to fail.
        let st = support::wait_for(WAIT, "export to report failing", || {
            let st = h.status.snapshot().export;
            (st.state == "failing" && st.failures >= 1).then_some(st)
        });
        assert!(st.reason.is_some(), "{st:?}");
        support::wait_for(WAIT, "status to report the drops", || {
            let st = h.status.snapshot().export;
            (st.dropped > 0 && st.dropped == h.telemetry.dropped_spans.get()).then_some(())
        });

        // The collector comes back on the same port.
        let sink = Sink::start_with(SinkOptions {
            grpc_addr: Some(grpc_addr),
            http_addr: Some(http_addr),
            ..SinkOptions::default()
        })
        .await
        .unwrap();
        // The newest span (the last event) arrives, and everything not dropped does too.
        sink.wait_for_spans(1, WAIT, |s| {
            s.attr("network.local.port") == Some(&Value::Int((total % 60000) as i64 + 1024))
        })
        .await
        .unwrap();
        let expected = (total - h.telemetry.dropped_spans.get()) as usize;
        sink.wait_for_spans(expected, WAIT, |_| true).await.unwrap();
        support::wait_for(WAIT, "export to report running again", || {
            (h.status.snapshot().export.state == "running").then_some(())
        });
        assert_eq!(
            sink.span_count() as u64 + h.telemetry.dropped_spans.get(),
            total,
            "{protocol:?}: every span is either delivered or counted as dropped"
        );
        h.shutdown().await;
        sink.stop().await;
    }
}

/// A collector that answers slowly: pressure builds up to the bounded export queue and stops
/// there; the producer's `send` never waits and the pipeline channel never overflows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_backs_up_to_the_queue_not_into_the_probe() {
    let sink = Sink::start_with(SinkOptions {
        delay: Duration::from_millis(300),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let bound = 128 * 1024;
    let mut config = test_config(&sink.grpc_endpoint(), OtlpProtocol::Grpc);
    config.queue_max_bytes = bound;
    config.batch_size = 100;
    let h = Harness::start(config);
    // 4,000 connections/s for a second: little for the pipeline, far more than a collector
    // that takes 300 ms per request of 100 spans can take.
    let total = 4_000u64;
    let mut slowest = Duration::ZERO;
    let mut max_queue = 0;
    for chunk in 0..(total / 200) {
        for i in 0..200 {
            let ev = close_with_id(chunk * 200 + i + 1);
            let t = std::time::Instant::now();
            assert!(h.input.send(ev), "the pipeline channel overflowed");
            slowest = slowest.max(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        max_queue = max_queue.max(h.telemetry.queue_bytes.get());
    }
    support::wait_for(WAIT, "every event to be taken", || {
        (h.telemetry.events.get() == total).then_some(())
    });
    assert!(
        slowest < Duration::from_millis(250),
        "a send into the pipeline waited {slowest:?}"
    );
    assert!(
        max_queue as usize <= bound,
        "queue {max_queue} > bound {bound}"
    );
    assert!(
        max_queue as usize > bound / 2,
        "the queue took the pressure: {max_queue}"
    );
    assert!(
        h.telemetry.dropped_spans.get() > 0,
        "the full queue dropped its oldest"
    );
    assert_eq!(h.telemetry.channel_drops.get(), 0);
    // The slow collector still gets data.
    sink.wait_for_spans(100, WAIT, |_| true).await.unwrap();
    h.shutdown().await;
}

/// Export settings follow the synced config without a restart; a bad synced section is
/// rejected with a clear reason and the last good settings stay in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_settings_switch_collector_live_and_bad_ones_are_rejected() {
    let a = Sink::start().await.unwrap();
    let b = Sink::start().await.unwrap();
    let h = Harness::start(test_config(&a.grpc_endpoint(), OtlpProtocol::Grpc));
    h.send_all([close_with_id(10)]);
    a.wait_for_spans(1, WAIT, |_| true).await.unwrap();

    h.sync_export(serde_json::json!({
        "endpoint": b.http_endpoint(),
        "protocol": "http",
        "resource": {"deployment.environment": "synced"}
    }));
    support::wait_for(WAIT, "the new endpoint", || {
        (h.status.snapshot().export.endpoint == Some(b.http_endpoint())).then_some(())
    });
    h.send_all([close_with_id(11)]);
    let got = b.wait_for_spans(1, WAIT, |_| true).await.unwrap();
    assert_eq!(got[0].transport, edgeward_otlp_sink::Transport::Http);
    assert_eq!(
        got[0].resource.get("deployment.environment"),
        Some(&s("synced"))
    );
    assert_eq!(a.span_count(), 1);

    h.sync_export(serde_json::json!({"endpoint": "tcp://nowhere", "protocol": "http"}));
    support::wait_for(WAIT, "the rejection", || {
        h.status.snapshot().export.config_error
    });
    let err = h.status.snapshot().export.config_error.unwrap();
    assert!(err.contains("tcp://nowhere"), "{err}");
    assert_eq!(h.telemetry.config_errors.get(), 1);
    h.send_all([close_with_id(12)]);
    b.wait_for_spans(2, WAIT, |_| true).await.unwrap();
    h.shutdown().await;
}

/// Retryable answers (UNAVAILABLE / 503) are retried with backoff until delivered, once;
/// permanent ones (INVALID_ARGUMENT / 400) drop the request and count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_permanent_ones_dropped_and_counted() {
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::Http] {
        let sink = Sink::start().await.unwrap();
        let endpoint = match protocol {
            OtlpProtocol::Grpc => sink.grpc_endpoint(),
            OtlpProtocol::Http => sink.http_endpoint(),
        };
        let mut config = test_config(&endpoint, protocol);
        config.metrics_interval = Duration::from_secs(60);
        let h = Harness::start(config);
        sink.fail_next(3, Failure::Retryable);
        h.send_all([close_with_id(300)]);
        let spans = sink.wait_for_spans(1, WAIT, |_| true).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            sink.span_count(),
            1,
            "{protocol:?}: delivered once: {spans:?}"
        );
        assert_eq!(sink.failed_requests(), 3);
        assert_eq!(h.telemetry.failures.get(), 3, "{protocol:?}");
        assert_eq!(h.telemetry.dropped_spans.get(), 0);

        sink.fail_next(1, Failure::Permanent);
        h.send_all([close_with_id(301)]);
        support::wait_for(WAIT, "the rejected request to be counted", || {
            (h.telemetry.dropped_spans.get() == 1).then_some(())
        });
        assert_eq!(h.telemetry.failures.get(), 4);
        h.send_all([close_with_id(302)]);
        sink.wait_for_spans(2, WAIT, |_| true).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            sink.span_count(),
            2,
            "{protocol:?}: the rejected span was not resent"
        );
        h.shutdown().await;
        sink.stop().await;
    }
}

/// The cardinality cap: beyond `max_series` attribute sets, updates fold into one overflow
/// series, and the folds are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_cardinality_cap_folds_into_a_counted_overflow_series() {
    let sink = Sink::start().await.unwrap();
    let mut config = test_config(&sink.grpc_endpoint(), OtlpProtocol::Grpc);
    config.metric_attributes = vec!["network.peer.port".into()];
    config.max_series = 2;
    let h = Harness::start(config);
    h.send_all((0..5u16).map(|i| {
        let mut ev = event(EventKind::Close, Direction::Active, "10.9.0.1:1000");
        ev.peer.set_port(1000 + i);
        ev
    }));
    let closed = sink
        .wait_for_metric("edgeward.tcp.connections.closed", WAIT, |m| {
            m.total() == 5.0
        })
        .await
        .unwrap();
    assert_eq!(closed.points.len(), 3, "{closed:?}");
    let overflow = closed
        .point(&[("otel.metric.overflow", Value::Bool(true))])
        .expect("an overflow series");
    assert_eq!(overflow.value, 3.0);
    assert_eq!(overflow.attributes.len(), 1);
    // Three events folded, each in 4 counters and 2 histograms.
    assert_eq!(h.telemetry.metric_overflow.get(), 18);
    let reported = sink
        .wait_for_metric("edgeward.export.metric_overflow", WAIT, |m| {
            m.total() == 18.0
        })
        .await
        .unwrap();
    assert_eq!(reported.total(), 18.0);
    h.shutdown().await;
}

/// A bearer token file that is missing at start: export fails and says why, spans wait in
/// the queue, and export starts by itself once the file appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_file_fails_then_recovers_when_it_appears() {
    let sink = Sink::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let mut config = test_config(&sink.grpc_endpoint(), OtlpProtocol::Grpc);
    config.bearer_token_file = Some(token.clone());
    let h = Harness::start(config);
    h.send_all([close_with_id(70)]);
    support::wait_for(WAIT, "a failure naming the token file", || {
        let st = h.status.snapshot().export;
        (st.state == "failing" && st.reason.as_deref().is_some_and(|r| r.contains("token")))
            .then_some(())
    });
    assert_eq!(sink.span_count(), 0);
    std::fs::write(&token, "late-token").unwrap();
    let spans = sink.wait_for_spans(1, WAIT, |_| true).await.unwrap();
    assert_eq!(spans.len(), 1);
    assert!(
        sink.request_headers()
            .iter()
            .all(|h| h.get("authorization").map(String::as_str) == Some("Bearer late-token"))
    );
    support::wait_for(WAIT, "running again", || {
        (h.status.snapshot().export.state == "running").then_some(())
    });
    h.shutdown().await;
}

/// Shutdown stops intake, and what is batched or queued is flushed before the tasks end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_batched_and_queued_spans() {
    let sink = Sink::start().await.unwrap();
    let mut config = test_config(&sink.grpc_endpoint(), OtlpProtocol::Grpc);
    config.batch_timeout = Duration::from_secs(60);
    config.batch_size = 10_000;
    let h = Harness::start(config);
    h.send_all((0..250).map(|i| close_with_id(50_000 + i)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.span_count(), 0, "still batching");
    h.shutdown().await;
    assert_eq!(sink.span_count(), 250, "flushed on shutdown");
    assert!(
        sink.latest_metric("edgeward.pipeline.events")
            .is_some_and(|m| m.total() == 250.0),
        "last metrics flushed too"
    );
}
