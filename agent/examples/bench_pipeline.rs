//! Pipeline benchmark: recorded connection events (no kernel) through batching, a one-plugin
//! chain and OTLP export to a local receiver.
//!
//! `throughput` (default): the agent side (producer, pipeline, plugin stand-in, exporter and
//! its gRPC client) runs on ONE thread, so events per second of that thread's CPU time is
//! "connections/s per core". The receiver runs on other threads and is not counted. Two legs
//! alternate over several rounds: the baseline (batching + the same policy, export turned
//! off) and the full path (with OTLP export over gRPC); the ratio full/baseline is printed.
//!
//! `rss`: paces 10,000 connections/s through the full path to a receiver in a child process,
//! samples this process's RSS every second with the collector up, then kills the collector and
//! keeps going (collector down), and prints the RSS range of each phase.
//!
//! Run with `scripts/bench-pipeline.sh` (release build).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use edgeward::{
    export::{ExportConfig, ExportTelemetry, Exporter, OtlpProtocol, spans::NodeIdentity},
    pipeline::{self, BatchPolicy},
    probe::event::{CloseReason, ConnectionEvent, Direction, EventKind, SmolStr},
    status::StatusHandle,
};
use edgeward_otlp_sink::{Sink, SinkOptions};
use tokio_util::sync::CancellationToken;

/// Stands in for the WASM plugin chain with the host-side work it does per batch: each event
/// is written as a fixed 64-byte little-endian record into one flat buffer, a policy reads the
/// records back (drop peer port 22, tag the rest) and verdict codes come back, one per event.
struct FlatBufferPolicy;

impl BatchPolicy for FlatBufferPolicy {
    fn apply(&self, batch: &mut Vec<ConnectionEvent>) {
        let mut flat = Vec::with_capacity(batch.len() * 64);
        for ev in batch.iter() {
            let mut rec = [0u8; 64];
            rec[0..8].copy_from_slice(&ev.conn_id.to_le_bytes());
            rec[8..10].copy_from_slice(&ev.local.port().to_le_bytes());
            rec[10..12].copy_from_slice(&ev.peer.port().to_le_bytes());
            rec[12..16].copy_from_slice(&ev.tgid.to_le_bytes());
            rec[16..24].copy_from_slice(&ev.bytes_sent.to_le_bytes());
            rec[24..32].copy_from_slice(&ev.bytes_received.to_le_bytes());
            rec[32..36].copy_from_slice(&ev.srtt_us.to_le_bytes());
            rec[36..40].copy_from_slice(&ev.retransmits.to_le_bytes());
            let comm = ev.comm.as_bytes();
            let n = comm.len().min(16);
            rec[40..40 + n].copy_from_slice(&comm[..n]);
            flat.extend_from_slice(&rec);
        }
        let verdicts: Vec<u8> = std::hint::black_box(&flat)
            .chunks_exact(64)
            .map(|r| u8::from(u16::from_le_bytes([r[10], r[11]]) == 22))
            .collect();
        let mut i = 0;
        batch.retain(|_| {
            let keep = verdicts[i] == 0;
            i += 1;
            keep
        });
    }
}

fn recorded_events(n: usize) -> Vec<ConnectionEvent> {
    let comms: Vec<SmolStr> = ["curl", "nginx", "envoy", "postgres", "java"]
        .iter()
        .map(SmolStr::new)
        .collect();
    (0..n)
        .map(|i| {
            let start = 1_700_000_000_000_000_000u64 + i as u64 * 1_000;
            ConnectionEvent {
                kind: EventKind::Close,
                conn_id: i as u64 + 1,
                direction: if i % 3 == 0 {
                    Direction::Passive
                } else {
                    Direction::Active
                },
                local: SocketAddr::from(([10, 0, 0, 1], 30000 + (i % 20000) as u16)),
                peer: SocketAddr::from((
                    [10, 1, (i / 250 % 250) as u8, (i % 250) as u8],
                    [443, 80, 5432, 8080][i % 4],
                )),
                pid: 1000 + (i % 50) as u32,
                tgid: 1000 + (i % 50) as u32,
                comm: comms[i % comms.len()].clone(),
                cgroup_id: 4000 + (i % 20) as u64,
                netns: 4026531840,
                start_unix_nanos: start,
                end_unix_nanos: start + 1_000_000 + (i as u64 % 1000) * 10_000,
                bytes_sent: 512 + i as u64 % 4096,
                bytes_received: 2048 + i as u64 % 65536,
                srtt_us: 100 + (i % 900) as u32,
                rttvar_us: 50,
                retransmits: (i % 7 == 0) as u32,
                close_reason: if i % 50 == 0 {
                    CloseReason::Reset
                } else {
                    CloseReason::Normal
                },
                started_before_probe: false,
                executable: Some(comms[i % comms.len()].clone()),
                container_id: Some(Arc::from(
                    "4f1e3b0c9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f",
                )),
                pod_uid: Some(Arc::from("8d6c2a4e-1b3f-4c5d-9e7f-0a1b2c3d4e5f")),
                edits: Vec::new(),
            }
        })
        .collect()
}

/// CPU time (user + system) of the calling thread, from /proc/thread-self/schedstat (ns).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn config(endpoint: Option<String>) -> ExportConfig {
    ExportConfig {
        endpoint,
        protocol: OtlpProtocol::Grpc,
        batch_size: 512,
        batch_timeout: Duration::from_millis(200),
        metrics_interval: Duration::from_secs(5),
        retry_initial_backoff: Duration::from_millis(100),
        retry_max_backoff: Duration::from_secs(1),
        ..ExportConfig::default()
    }
}

/// The pipeline and the exporter, wired as `edgeward run` wires them (with
/// [`FlatBufferPolicy`] as the plugin chain) and spawned on the current runtime.
struct Running {
    input: pipeline::PipelineInput,
    telemetry: ExportTelemetry,
    shutdown: CancellationToken,
    pipeline: tokio::task::JoinHandle<()>,
    exporter: tokio::task::JoinHandle<()>,
    /// Kept so the policy channel stays open.
    _policy: tokio::sync::watch::Sender<Arc<dyn BatchPolicy>>,
}

fn start(cfg: &ExportConfig, flush_deadline: Duration) -> Running {
    let telemetry = ExportTelemetry::default();
    let (exporter, handle) = Exporter::build(
        cfg,
        NodeIdentity {
            host_name: "bench".to_owned(),
            k8s_node_name: None,
        },
        StatusHandle::new("bench"),
        telemetry.clone(),
        None,
    );
    let (input, rx) = pipeline::channel(16_384, telemetry.clone());
    let (policy, policy_rx) =
        tokio::sync::watch::channel::<Arc<dyn BatchPolicy>>(Arc::new(FlatBufferPolicy));
    let shutdown = CancellationToken::new();
    let done = CancellationToken::new();
    Running {
        input,
        telemetry,
        pipeline: tokio::spawn(pipeline::run(
            rx,
            policy_rx,
            handle,
            shutdown.clone(),
            done.clone(),
        )),
        exporter: tokio::spawn(exporter.run(done, flush_deadline)),
        shutdown,
        _policy: policy,
    }
}

/// One leg on the current (single-threaded) runtime: (events/s of thread CPU, wall events/s,
/// spans delivered).
async fn leg(events: &[ConnectionEvent], endpoint: Option<String>, sink: &Sink) -> (f64, f64, u64) {
    // Spawned tasks first run at the first await below, inside the timed region.
    let Running {
        input,
        telemetry,
        shutdown,
        pipeline: p,
        exporter: e,
        _policy,
    } = start(&config(endpoint.clone()), Duration::from_secs(30));
    let before_sink = sink.span_total();
    let cpu0 = thread_cpu();
    let wall0 = Instant::now();
    let queue_limit = (config(None).queue_max_bytes / 2) as i64;
    for chunk in events.chunks(1024) {
        // Pace the producer by the export queue so that nothing is dropped and every event
        // measured is also delivered (the probe never waits; this benchmark's producer may).
        while input.capacity() < chunk.len() || telemetry.queue_bytes.get() > queue_limit {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // One batch per chunk, as the probe hands over one per drain of its ring buffer.
        input.send_batch(chunk.to_vec());
        tokio::task::yield_now().await;
    }
    while telemetry.events.get() < events.len() as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    shutdown.cancel();
    let _ = p.await;
    let _ = e.await;
    let cpu = (thread_cpu() - cpu0).as_secs_f64();
    let wall = wall0.elapsed().as_secs_f64();
    let expected = telemetry.spans.get() - telemetry.dropped_spans.get();
    let mut delivered = 0;
    if endpoint.is_some() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sink.span_total() - before_sink < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        delivered = sink.span_total() - before_sink;
    }
    assert_eq!(
        telemetry.channel_drops.get(),
        0,
        "the paced producer never drops"
    );
    assert_eq!(
        telemetry.dropped_spans.get(),
        0,
        "the paced producer loses no span"
    );
    let n = events.len() as f64;
    (n / cpu, n / wall, delivered)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn throughput(n: usize, rounds: usize) {
    // The receiver: its own runtime on other threads, not counted in the agent's CPU.
    let sink_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("receiver runtime");
    let sink = sink_rt
        .block_on(Sink::start_with(SinkOptions {
            discard: true,
            ..SinkOptions::default()
        }))
        .expect("receiver");
    let endpoint = sink.grpc_endpoint();
    let events = recorded_events(n);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("agent runtime");
    println!(
        "pipeline throughput: {n} recorded close events per leg, {rounds} rounds, one agent thread; receiver on other threads"
    );
    let (mut base, mut full) = (Vec::new(), Vec::new());
    let (_, _, _) = rt.block_on(leg(&events[..n / 10], Some(endpoint.clone()), &sink)); // warm-up
    for round in 1..=rounds {
        let (b_cpu, b_wall, _) = rt.block_on(leg(&events, None, &sink));
        let (f_cpu, f_wall, delivered) = rt.block_on(leg(&events, Some(endpoint.clone()), &sink));
        println!(
            "round {round}: baseline (batch + policy, no export) {b_cpu:>9.0} ev/s/core ({b_wall:.0} wall) | full (+ OTLP gRPC export) {f_cpu:>9.0} ev/s/core ({f_wall:.0} wall), delivered {delivered}"
        );
        base.push(b_cpu);
        full.push(f_cpu);
    }
    let (b, f) = (median(base.clone()), median(full.clone()));
    let spread = |v: &[f64]| {
        let min = v.iter().cloned().fold(f64::MAX, f64::min);
        let max = v.iter().cloned().fold(0.0, f64::max);
        (min, max)
    };
    let (fmin, fmax) = spread(&full);
    println!("median baseline: {b:.0} connections/s per core");
    println!(
        "median full path: {f:.0} connections/s per core (spread {fmin:.0}..{fmax:.0}); target >= 150000: {}",
        if f >= 150_000.0 { "met" } else { "NOT met" }
    );
    println!("ratio full/baseline: {:.2}", f / b);
    drop(sink);
}

fn rss(sink_bin: &str, up_secs: u64, down_secs: u64, rate: u64) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = std::process::Command::new(sink_bin)
        .args([
            "--quiet",
            "--grpc",
            &format!("127.0.0.1:{port}"),
            "--http",
            &format!("127.0.0.1:{http_port}"),
        ])
        .spawn()
        .expect("starting the receiver");
    std::thread::sleep(Duration::from_millis(500));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let events = recorded_events(10_000);
    let cfg = config(Some(format!("http://127.0.0.1:{port}")));
    println!(
        "rss: {rate} connections/s, collector up {up_secs} s then down {down_secs} s; queue bound {} MiB",
        cfg.queue_max_bytes >> 20
    );
    println!("rss before start: {:.1} MiB", rss_mib());
    rt.block_on(async {
        let Running {
            input,
            telemetry,
            shutdown,
            _policy,
            ..
        } = start(&cfg, Duration::from_secs(1));
        let tick = Duration::from_millis(10);
        let per_tick = (rate / 100) as usize;
        let mut next = tokio::time::Instant::now();
        let mut i = 0usize;
        let mut phase_samples: Vec<(&str, Vec<f64>)> = vec![("up", vec![]), ("down", vec![])];
        let start = Instant::now();
        let mut killed = false;
        let mut last_sample = Instant::now();
        while start.elapsed() < Duration::from_secs(up_secs + down_secs) {
            // Each tick's events go over as one batch, as the probe's do.
            let mut batch = Vec::with_capacity(per_tick);
            for _ in 0..per_tick {
                let mut ev = events[i % events.len()].clone();
                ev.conn_id = i as u64;
                batch.push(ev);
                i += 1;
            }
            input.send_batch(batch);
            next += tick;
            tokio::time::sleep_until(next).await;
            if !killed && start.elapsed() >= Duration::from_secs(up_secs) {
                let _ = child.kill();
                let _ = child.wait();
                killed = true;
            }
            if last_sample.elapsed() >= Duration::from_secs(1) {
                last_sample = Instant::now();
                let phase = usize::from(killed);
                phase_samples[phase].1.push(rss_mib());
                if phase_samples[phase].1.len().is_multiple_of(10) {
                    println!(
                        "  t={:>3}s phase={} rss={:.1} MiB queue={:.1} MiB dropped_spans={} channel_drops={}",
                        start.elapsed().as_secs(),
                        phase_samples[phase].0,
                        rss_mib(),
                        telemetry.queue_bytes.get() as f64 / 1048576.0,
                        telemetry.dropped_spans.get(),
                        telemetry.channel_drops.get()
                    );
                }
            }
        }
        for (name, samples) in &phase_samples {
            if samples.is_empty() {
                continue;
            }
            let min = samples.iter().cloned().fold(f64::MAX, f64::min);
            let max = samples.iter().cloned().fold(0.0, f64::max);
            let last = samples[samples.len() - 1];
            println!(
                "rss collector {name}: min {min:.1} MiB, max {max:.1} MiB, last {last:.1} MiB over {} samples; target <= 50 MiB: {}",
                samples.len(),
                if max <= 50.0 { "met" } else { "NOT met" }
            );
        }
        println!(
            "sent {i} events; spans dropped while down: {}; channel drops: {}",
            telemetry.dropped_spans.get(),
            telemetry.channel_drops.get()
        );
        shutdown.cancel();
    });
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match args.first().map(String::as_str) {
        Some("rss") => rss(
            &arg("--sink-bin").unwrap_or_else(|| "target/release/edgeward-otlp-sink".to_owned()),
            arg("--up").and_then(|v| v.parse().ok()).unwrap_or(20),
            arg("--down").and_then(|v| v.parse().ok()).unwrap_or(60),
            arg("--rate").and_then(|v| v.parse().ok()).unwrap_or(10_000),
        ),
        _ => throughput(
            arg("--events")
                .and_then(|v| v.parse().ok())
                .unwrap_or(300_000),
            arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(5),
        ),
    }
}
