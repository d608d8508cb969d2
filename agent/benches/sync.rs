//! Benchmarks of config sync against a real etcd on loopback. Run with
//! `cargo bench -p edgeward --bench sync` (or `scripts/bench-sync.sh`); it prints:
//!
//! 1. propagation: put → change applied by the sync component, p50/p99 over 1,000 puts, next
//!    to a bare etcd watch measured in the same run (the floor any etcd client has);
//! 2. start from the offline cache with etcd unreachable → `/readyz` OK, next to a start with
//!    nothing to load (built-in defaults);
//! 3. fleet: 1,000 sync components (one client and one watch each) on one etcd; one put → all
//!    applied, p99, and memory per watcher.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use edgeward::{
    status::{ConfigSource, StatusHandle},
    sync::{self, Applier, DesiredState, EtcdConfig, SyncMetrics},
};
use support::{Agent, Etcd, EtcdVersion, http_get};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "/edgeward/v1";

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// A sync component (the same code `edgeward run` uses) following `endpoint`.
fn start_watcher(
    endpoint: &str,
    node: &str,
    shutdown: &CancellationToken,
) -> watch::Receiver<Arc<DesiredState>> {
    let config = EtcdConfig {
        endpoints: vec![endpoint.to_owned()],
        ..EtcdConfig::default()
    };
    let (tx, rx) = watch::channel(Arc::new(DesiredState::empty(ConfigSource::Default)));
    let status = StatusHandle::new(node);
    let applier = Applier::new(PREFIX, node, tx, status.clone(), SyncMetrics::default());
    tokio::spawn(sync::etcd::run(
        config,
        applier,
        status,
        SyncMetrics::default(),
        shutdown.clone(),
    ));
    rx
}

async fn propagation(etcd: &Etcd, puts: usize) {
    let shutdown = CancellationToken::new();
    let mut rx = start_watcher(&etcd.client_url, "bench-node", &shutdown);
    let mut client = etcd_client::Client::connect([etcd.client_url.as_str()], None)
        .await
        .unwrap();
    rx.wait_for(|s| s.source == ConfigSource::Etcd)
        .await
        .unwrap();

    // The floor: a bare watch on the same key, no agent logic.
    let (mut _w, mut raw) = {
        let mut wc = client.watch_client();
        let stream = wc
            .watch(format!("{PREFIX}/config/global"), None)
            .await
            .unwrap();
        (wc, stream)
    };
    raw.message().await.unwrap(); // created

    let key = format!("{PREFIX}/config/global");
    let (mut agent_lat, mut raw_lat) = (Vec::with_capacity(puts), Vec::with_capacity(puts));
    for i in 0..puts {
        // Alternate which measurement waits first, so neither always pays for the other.
        let start = Instant::now();
        let revision = client
            .put(key.clone(), format!("{{\"i\": {i}}}"), None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let (agent_done, raw_done) = tokio::join!(
            async {
                rx.wait_for(|s| s.revision >= revision).await.unwrap();
                start.elapsed()
            },
            async {
                loop {
                    let m = raw.message().await.unwrap().unwrap();
                    if m.events()
                        .iter()
                        .any(|e| e.kv().is_some_and(|kv| kv.mod_revision() >= revision))
                    {
                        return start.elapsed();
                    }
                }
            }
        );
        agent_lat.push(agent_done);
        raw_lat.push(raw_done);
    }
    shutdown.cancel();
    let (a50, a99) = (
        percentile(&mut agent_lat, 0.5),
        percentile(&mut agent_lat, 0.99),
    );
    let (r50, r99) = (
        percentile(&mut raw_lat, 0.5),
        percentile(&mut raw_lat, 0.99),
    );
    println!(
        "propagation over {puts} puts (put issued -> applied), loopback etcd {}:",
        etcd_version(etcd)
    );
    println!("  edgeward sync   p50 {}  p99 {}", ms(a50), ms(a99));
    println!("  bare etcd watch p50 {}  p99 {}", ms(r50), ms(r99));
    println!(
        "  ratio (sync / bare watch)  p50 {:.2}  p99 {:.2}   target: p99 < 20 ms",
        a50.as_secs_f64() / r50.as_secs_f64(),
        a99.as_secs_f64() / r99.as_secs_f64()
    );
}

fn etcd_version(etcd: &Etcd) -> String {
    etcd.etcdctl(&["version"])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

fn time_to_ready(args: &[&str], root: &std::path::Path) -> Duration {
    let start = Instant::now();
    let agent = Agent::start_in(root, "bench-node", args);
    let url = agent.url("/readyz");
    loop {
        if let Ok((200, _)) = http_get(&url) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not ready: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn start_from_cache(etcd: &mut Etcd, rounds: usize) {
    let root = tempfile::tempdir().unwrap();
    // A cache with some substance: 200 config keys and a 300 KB module's chunk.
    for i in 0..200 {
        etcd.put(
            &format!("{PREFIX}/config/nodes/n{i}"),
            &format!("{{\"i\": {i}}}"),
        );
    }
    let blob = "m".repeat(100 * 1024);
    for i in 0..3 {
        etcd.put(&format!("{PREFIX}/blobs/sha256/{:064x}/000{i}", 1), &blob);
    }
    let endpoint = etcd.client_url.clone();
    let mut warm = Agent::spawn_in(
        root.path(),
        "bench-node",
        &["--etcd-endpoints", &endpoint, "--no-ebpf"],
    );
    warm.wait_ready(Duration::from_secs(20));
    support::wait_for(Duration::from_secs(20), "the cache", || {
        warm.try_cache_inspect()
    });
    warm.terminate(Duration::from_secs(10));
    etcd.kill();

    let defaults_root = tempfile::tempdir().unwrap();
    let (mut cache, mut defaults) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        cache.push(time_to_ready(
            &["--etcd-endpoints", &endpoint, "--no-ebpf"],
            root.path(),
        ));
        defaults.push(time_to_ready(&["--no-ebpf"], defaults_root.path()));
    }
    let (c50, c99) = (percentile(&mut cache, 0.5), percentile(&mut cache, 0.99));
    let (d50, d99) = (
        percentile(&mut defaults, 0.5),
        percentile(&mut defaults, 0.99),
    );
    println!("start -> /readyz OK over {rounds} starts each (process spawn included):");
    println!(
        "  from cache, etcd unreachable   p50 {}  max {}",
        ms(c50),
        ms(c99)
    );
    println!(
        "  built-in defaults (baseline)   p50 {}  max {}",
        ms(d50),
        ms(d99)
    );
    println!(
        "  ratio p50 {:.2}   target: < 1 s",
        c50.as_secs_f64() / d50.as_secs_f64()
    );
    etcd.restart();
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn fleet(etcd: &Etcd, watchers: usize, puts: usize) {
    let shutdown = CancellationToken::new();
    let before = rss_kib();
    let mut receivers = Vec::with_capacity(watchers);
    for i in 0..watchers {
        receivers.push(start_watcher(
            &etcd.client_url,
            &format!("node-{i}"),
            &shutdown,
        ));
    }
    for rx in &mut receivers {
        tokio::time::timeout(
            Duration::from_secs(60),
            rx.wait_for(|s| s.source == ConfigSource::Etcd),
        )
        .await
        .expect("every watcher connects within 60 s")
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib();
    let mut client = etcd_client::Client::connect([etcd.client_url.as_str()], None)
        .await
        .unwrap();
    let mut all_p99 = Vec::new();
    let mut last_p99 = Vec::new();
    for round in 0..puts {
        let start = Instant::now();
        let revision = client
            .put(
                format!("{PREFIX}/config/global"),
                format!("{{\"round\": {round}}}"),
                None,
            )
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let mut waits = Vec::with_capacity(watchers);
        for rx in &receivers {
            let mut rx = rx.clone();
            waits.push(tokio::spawn(async move {
                rx.wait_for(|s| s.revision >= revision).await.unwrap();
                start.elapsed()
            }));
        }
        let mut lat = Vec::with_capacity(watchers);
        for w in waits {
            lat.push(w.await.unwrap());
        }
        all_p99.push(percentile(&mut lat, 0.99));
        last_p99.push(*lat.last().unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    let per_watcher = (after.saturating_sub(before)) as f64 / watchers as f64;
    println!(
        "fleet: {watchers} sync components (own client + watch each) on one etcd, {puts} puts:"
    );
    println!(
        "  put -> applied by all: p99 across watchers, median of rounds {}  (worst round {})",
        ms(percentile(&mut all_p99, 0.5)),
        ms(*all_p99.iter().max().unwrap())
    );
    println!(
        "  last watcher applied: median of rounds {}   target: p99 < 500 ms",
        ms(percentile(&mut last_p99, 0.5))
    );
    println!(
        "  memory: {per_watcher:.1} KiB RSS per watcher ({} MiB for {watchers})",
        (after - before) / 1024
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; anything else names the parts to run.
    let only: Vec<&str> = args[1..]
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| only.is_empty() || only.contains(&name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut etcd = Etcd::start(EtcdVersion::V3_5);
    println!(
        "edgeward sync benchmarks — {} cores, etcd {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        etcd_version(&etcd)
    );
    if run("propagation") {
        runtime.block_on(propagation(&etcd, 1000));
    }
    if run("start") {
        start_from_cache(&mut etcd, 20);
    }
    if run("fleet") {
        runtime.block_on(fleet(&etcd, 1000, 10));
    }
}
