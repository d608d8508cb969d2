//! The `edgeward` binary exporting to a real OTLP receiver: the runtime wires the pipeline and
//! exporter, self-telemetry reaches the collector and `/metrics`, `/status` reports export,
//! SIGTERM flushes and exits 0, and a bad export setting stops start-up with a clear cause.

mod support;

use std::time::Duration;

use support::{
    Agent, edgeward,
    otlp::{BlockingSink, Sink, SinkOptions},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_exports_self_telemetry_and_reports_export_state() {
    let sink = Sink::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[otlp]\nendpoint = \"{}\"\nprotocol = \"http\"\nmetrics_interval = \"200ms\"\ncompression = \"gzip\"\n\n[otlp.resource]\n\"deployment.environment\" = \"ci\"\n",
            sink.http_endpoint()
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let mut agent =
        tokio::task::spawn_blocking(move || Agent::spawn(&["--no-ebpf", "--config", &config_arg]))
            .await
            .unwrap();

    let m = sink
        .wait_for_metric(
            "edgeward.export.metric_batches",
            Duration::from_secs(15),
            |m| m.total() >= 1.0,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_eq!(
        m.resource.get("service.name").and_then(|v| v.as_str()),
        Some("edgeward")
    );
    assert_eq!(
        m.resource
            .get("deployment.environment")
            .and_then(|v| v.as_str()),
        Some("ci")
    );
    assert!(m.resource.contains_key("host.name"));
    for name in [
        "edgeward.pipeline.events",
        "edgeward.pipeline.channel_drops",
        "edgeward.export.dropped_spans",
        "edgeward.export.failures",
        "edgeward.export.queue_depth",
        "edgeward.probe.events",
        "edgeward.pipeline.chain_time",
        "edgeward.tcp.connections.opened",
    ] {
        assert!(sink.latest_metric(name).is_some(), "{name} not exported");
    }

    let agent = tokio::task::spawn_blocking(move || {
        let status = agent.status();
        assert_eq!(status["export"]["state"], "running", "{status}");
        assert_eq!(status["export"]["protocol"], "http", "{status}");
        let (code, metrics) = agent.get("/metrics");
        assert_eq!(code, 200);
        for name in [
            "edgeward_export_metric_batches_total",
            "edgeward_pipeline_channel_drops_total",
            "edgeward_export_dropped_spans_total",
            "edgeward_export_queue_bytes",
            "edgeward_pipeline_chain_seconds",
        ] {
            assert!(
                metrics.contains(name),
                "{name} missing from /metrics:\n{metrics}"
            );
        }
        let (exit, took) = agent.terminate(Duration::from_secs(15));
        assert!(exit.success(), "exit {exit:?}\n{}", agent.log());
        assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
        agent
    })
    .await
    .unwrap();
    assert!(
        agent.log().contains("OTLP export flushed"),
        "{}",
        agent.log()
    );
    sink.stop().await;
}

#[test]
fn https_endpoint_without_ca_is_refused_with_the_key_named() {
    let (code, _out, err) = edgeward(&[
        "run",
        "--no-ebpf",
        "--otlp-endpoint",
        "https://collector.invalid:4317",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("otlp.tls.ca_file"), "{err}");
}

/// With the collector unreachable, SIGTERM still ends the agent within its shutdown deadline,
/// exit status 0, and what could not be flushed is counted.
#[test]
fn sigterm_with_the_collector_down_exits_zero_within_the_deadline() {
    let port = support::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::spawn(&["--no-ebpf", "--otlp-endpoint", &endpoint]);
    support::wait_for(Duration::from_secs(10), "export configured", || {
        let st = agent.status();
        (st["export"]["endpoint"] == endpoint.as_str()).then_some(())
    });
    let (exit, took) = agent.terminate(Duration::from_secs(15));
    assert!(exit.success(), "exit {exit:?}\n{}", agent.log());
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("OTLP export flushed"),
        "{}",
        agent.log()
    );
}

/// The blocking sink helper (for end-to-end tests that are not async) against the binary.
#[test]
fn blocking_sink_receives_the_agents_metrics() {
    let sink = BlockingSink::start(SinkOptions::default());
    let endpoint = sink.get().grpc_endpoint();
    let mut agent = Agent::spawn(&["--no-ebpf", "--otlp-endpoint", &endpoint]);
    // Metrics go out every otlp.metrics_interval (10 s by default) and at shutdown.
    let (exit, _) = agent.terminate(Duration::from_secs(15));
    assert!(exit.success(), "{}", agent.log());
    let m = sink.wait_for_metric(
        "edgeward.export.metric_batches",
        Duration::from_secs(5),
        |_| true,
    );
    assert_eq!(
        m.resource.get("service.name").and_then(|v| v.as_str()),
        Some("edgeward")
    );
}
