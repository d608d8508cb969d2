//! Plugin host benchmark (run it through `scripts/bench-plugins.sh`, which builds the plugins
//! and this binary in release mode).
//!
//! 1. Host time per event of a trivial plugin (drop peer port 22) on batches of 256, against
//!    the same policy as a native Rust closure, in the same run.
//! 2. Events per second of the chain of the four example plugins, on one core.
//! 3. Swap latency (manifest change → new chain active), p50/p99: cold (empty compile cache),
//!    warm (compiled module on disk, new host as after a restart) and hot (module already
//!    loaded, config change only).
//!
//! Usage: plugin-bench <dir with the example .wasm files> [--quick]

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use edgeward::{
    pipeline::BatchPolicy,
    plugins::{
        FailurePolicy, ModuleLocation, PluginHost, PluginLimits, PluginManifest, PluginMetrics,
        PluginRuntime, PluginsConfig,
    },
    probe::event::{CloseReason, ConnectionEvent, Direction, EventKind, SmolStr},
    status::{ConfigSource, StatusHandle},
    sync::DesiredState,
};
use serde_json::json;

const BATCH: usize = 256;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: plugin-bench <wasm dir> [--quick]"))?,
    );
    let quick = args.next().as_deref() == Some("--quick");
    let rounds = if quick { 200 } else { 2000 };

    let batches: Vec<Vec<ConnectionEvent>> = (0..64).map(|b| batch(b * BATCH as u64)).collect();
    let events_per_round = (batches.len() * BATCH) as f64;

    // 1. trivial plugin vs native closure
    let allow = read(&dir, "allowlist")?;
    let trivial = host_with(vec![plugin("deny-ssh", &allow, json!({"ports": [22]}), 1)])?;
    let native = |b: &mut Vec<ConnectionEvent>| b.retain(|e| e.peer.port() != 22);
    let (wasm_ns, native_ns) = {
        let mut best = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let w = time_per_event(&batches, rounds / 10, |b| trivial.apply(b))?;
            let n = time_per_event(&batches, rounds / 10, native)?;
            best = (best.0.min(w), best.1.min(n));
        }
        best
    };
    // The same batches, applied by nothing but the clone (what both numbers include).
    let clone_ns = time_per_event(&batches, rounds / 10, |_| {})?;
    println!("== trivial plugin (drop peer port 22), batches of {BATCH}");
    println!(
        "  wasm plugin:    {:>8.1} ns/event (host time incl. encode, call, verdicts)",
        wasm_ns - clone_ns
    );
    println!("  native closure: {:>8.1} ns/event", native_ns - clone_ns);
    println!(
        "  ratio wasm/native: {:.1}x   (target: wasm <= 100 ns/event)",
        (wasm_ns - clone_ns) / (native_ns - clone_ns).max(0.1)
    );

    // 2. chain of the four examples
    let chain = host_with(vec![
        plugin(
            "allowlist",
            &allow,
            json!({"mode": "deny", "cidrs": ["192.168.0.0/16"], "ports": [22]}),
            10,
        ),
        plugin(
            "sampler",
            &read(&dir, "sampler")?,
            json!({"keep_one_in": 2}),
            20,
        ),
        plugin(
            "redactor",
            &read(&dir, "redactor")?,
            json!({"mode": "hash", "key": "k"}),
            30,
        ),
        plugin(
            "tagger",
            &read(&dir, "tagger")?,
            json!({"attributes": {"env": "prod"}}),
            40,
        ),
    ])?;
    let ns = time_per_event(&batches, rounds / 10, |b| chain.apply(b))? - clone_ns;
    println!("== chain of four examples (allowlist, sampler 1/2, redactor hash, tagger), one core");
    println!(
        "  {:>8.1} ns/event = {:.0} events/s   (target: >= 1,000,000 events/s)",
        ns,
        1e9 / ns
    );
    let _ = events_per_round;

    // 3. swap latency
    let tagger = read(&dir, "tagger")?;
    println!(
        "== swap latency: manifest change -> new chain active (tagger, {} bytes)",
        tagger.len()
    );
    let n_cold = if quick { 10 } else { 40 };
    let n_warm = if quick { 30 } else { 200 };
    let runtime_dir = tempfile::tempdir()?;
    let mut cold = Vec::new();
    for i in 0..n_cold {
        let cache = tempfile::tempdir()?;
        let (mut host, _rx) = new_host(cache.path())?;
        let started = Instant::now();
        host.apply(&state(vec![plugin(
            "t",
            &tagger,
            json!({"attributes": {"i": i}}),
            1,
        )]))?;
        cold.push(started.elapsed());
    }
    report("cold (compile)", &mut cold, Duration::from_millis(500));
    {
        let (mut host, _rx) = new_host(runtime_dir.path())?;
        host.apply(&state(vec![plugin(
            "t",
            &tagger,
            json!({"attributes": {"i": -1}}),
            1,
        )]))?;
    }
    let mut warm = Vec::new();
    for i in 0..n_warm {
        let (mut host, _rx) = new_host(runtime_dir.path())?;
        let started = Instant::now();
        host.apply(&state(vec![plugin(
            "t",
            &tagger,
            json!({"attributes": {"i": i}}),
            1,
        )]))?;
        warm.push(started.elapsed());
    }
    report(
        "warm (compile cache on disk)",
        &mut warm,
        Duration::from_millis(50),
    );
    let (mut host, _rx) = new_host(runtime_dir.path())?;
    let mut hot = Vec::new();
    for i in 0..n_warm {
        let started = Instant::now();
        host.apply(&state(vec![plugin(
            "t",
            &tagger,
            json!({"attributes": {"i": i}}),
            1,
        )]))?;
        hot.push(started.elapsed());
    }
    report(
        "hot (module loaded, new config)",
        &mut hot,
        Duration::from_millis(50),
    );
    Ok(())
}

fn report(what: &str, samples: &mut [Duration], target: Duration) {
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "  {what:<34} n={:<4} p50 {:>7.2} ms  p99 {:>7.2} ms   (target p99 < {} ms)",
        samples.len(),
        p(0.5).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        target.as_millis()
    );
}

fn time_per_event(
    batches: &[Vec<ConnectionEvent>],
    rounds: usize,
    mut f: impl FnMut(&mut Vec<ConnectionEvent>),
) -> anyhow::Result<f64> {
    // Warm up, then time whole rounds over the batches (each applied to a fresh clone).
    for b in batches.iter().take(8) {
        f(&mut b.clone());
    }
    let started = Instant::now();
    let mut events = 0usize;
    for _ in 0..rounds.max(1) {
        for b in batches {
            let mut b = b.clone();
            events += b.len();
            f(&mut b);
            std::hint::black_box(&b);
        }
    }
    Ok(started.elapsed().as_nanos() as f64 / events as f64)
}

fn batch(first: u64) -> Vec<ConnectionEvent> {
    (0..BATCH as u64)
        .map(|i| {
            let id = first + i;
            let port = [443, 80, 22, 5432][(id % 4) as usize];
            ConnectionEvent {
                kind: EventKind::Close,
                conn_id: id,
                direction: Direction::Active,
                local: "10.0.0.1:40000".parse().expect("addr"),
                peer: format!("192.168.{}.{}:{port}", (id >> 8) % 256, id % 256)
                    .parse()
                    .expect("addr"),
                pid: 100,
                tgid: 100,
                comm: SmolStr::new("curl"),
                cgroup_id: 1,
                netns: 1,
                start_unix_nanos: 1,
                end_unix_nanos: 2,
                bytes_sent: 10,
                bytes_received: 20,
                srtt_us: 100,
                rttvar_us: 10,
                retransmits: 0,
                close_reason: if id.is_multiple_of(10) {
                    CloseReason::Refused
                } else {
                    CloseReason::Normal
                },
                started_before_probe: false,
                executable: Some(SmolStr::new("/usr/bin/curl")),
                container_id: None,
                pod_uid: None,
                edits: Vec::new(),
            }
        })
        .collect()
}

fn read(dir: &Path, short: &str) -> anyhow::Result<Arc<[u8]>> {
    let path = dir.join(format!("edgeward_example_{short}.wasm"));
    Ok(Arc::from(
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
    ))
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn plugin(
    name: &str,
    bytes: &Arc<[u8]>,
    config: serde_json::Value,
    order: i32,
) -> (PluginManifest, Arc<[u8]>) {
    (
        PluginManifest {
            name: name.to_owned(),
            version: String::new(),
            sha256: sha256(bytes),
            module: ModuleLocation::Etcd {
                size: bytes.len() as u64,
                chunks: 1,
            },
            config,
            order,
            failure_policy: FailurePolicy::FailOpen,
            limits: PluginLimits {
                batch_timeout: Duration::from_millis(50),
                memory_mib: 32,
            },
            node_selector: Default::default(),
            enabled: true,
            capabilities: Vec::new(),
        },
        bytes.clone(),
    )
}

fn state(plugins: Vec<(PluginManifest, Arc<[u8]>)>) -> DesiredState {
    let mut s = DesiredState::empty(ConfigSource::Etcd);
    for (m, b) in plugins {
        s.modules.insert(m.sha256.clone(), b);
        s.plugins.push(m);
    }
    s
}

fn new_host(cache: &Path) -> anyhow::Result<(PluginHost, edgeward::pipeline::PolicyRx)> {
    let runtime = PluginRuntime::new(Some(cache.to_owned()), PluginMetrics::unregistered())?;
    Ok(PluginHost::new(
        runtime,
        PluginsConfig::default(),
        StatusHandle::new("bench"),
    ))
}

fn host_with(plugins: Vec<(PluginManifest, Arc<[u8]>)>) -> anyhow::Result<Arc<dyn BatchPolicy>> {
    let cache = tempfile::tempdir()?;
    let (mut host, rx) = new_host(cache.path())?;
    host.apply(&state(plugins))?;
    let chain = rx.borrow().clone();
    // Keep the host (and its engine) alive for the whole run.
    std::mem::forget(host);
    Ok(chain)
}
