//! The probe side of `scripts/bench-probe.sh` (not a test: a measurement tool).
//!
//! `probe_bench floor` attaches only counting programs, on the same tracepoints as the probe
//! (the floor of any design on them); `probe_bench full NETNS_INODE` runs the agent's probe
//! (kernel programs, ring buffer reader, enrichment, bounded channels) and counts the events
//! of connections in the given network namespace, where the load generator runs. Both run
//! until stdin closes, then print one line of `key=value` results. With `--stats` (last
//! argument) the kernel's BPF run-time statistics are on while the harness runs and the line
//! has the programs' run time (`bpf_ns`); they cost every program run two clock reads, so
//! throughput legs run without them. `probe_bench full NETNS_INODE --untyped` attaches the
//! probe's untyped raw tracepoints instead of the BTF-typed ones (`typed_tracepoints =
//! false`), to compare the two forms in one run.

use std::{io::Read as _, time::Duration};

use edgeward::{
    probe::{FloorProbe, ProbeConfig, ProgramStats, event::Direction, event::EventKind},
    status::StatusHandle,
};

/// `bpf_runs=N bpf_ns=T` over all programs, then each program's share.
fn stats_line(stats: &[ProgramStats]) -> String {
    let runs: u64 = stats.iter().map(|s| s.run_count).sum();
    let ns: u64 = stats.iter().map(|s| s.run_time_ns).sum();
    let each: Vec<String> = stats
        .iter()
        .filter(|s| s.run_count > 0)
        .map(|s| format!("{}:{}runs/{}ns", s.name, s.run_count, s.run_time_ns))
        .collect();
    format!("bpf_runs={runs} bpf_ns={ns} programs={}", each.join(","))
}
use tokio_util::sync::CancellationToken;

fn wait_for_stdin_eof() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    // Kernel-wide BPF run-time statistics, on while this fd is open (restored at exit).
    let _stats = if args.last().is_some_and(|a| a == "--stats") {
        args.pop();
        Some(aya::sys::enable_stats(aya::sys::Stats::RunTime)?)
    } else {
        None
    };
    let untyped = args.iter().any(|a| a == "--untyped");
    args.retain(|a| a != "--untyped");
    match args.get(1).map(String::as_str) {
        Some("floor") => {
            let floor = FloorProbe::attach()?;
            println!("ready");
            wait_for_stdin_eof();
            println!(
                "state_changes={} {}",
                floor.state_changes(),
                stats_line(&floor.program_stats())
            );
            Ok(())
        }
        Some("full") => {
            let netns: u32 = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("usage: probe_bench full NETNS_INODE"))?;
            full(netns, !untyped)
        }
        _ => anyhow::bail!(
            "usage: probe_bench floor [--stats] | probe_bench full NETNS_INODE [--untyped] [--stats]"
        ),
    }
}

fn full(netns: u32, typed: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let status = StatusHandle::new("bench");
    let mut probe = {
        let _guard = rt.enter();
        ProbeConfig {
            typed_tracepoints: typed,
            ..ProbeConfig::default()
        }
        .start(&status)?
    };
    let mut rx = probe
        .take_events()
        .ok_or_else(|| anyhow::anyhow!("no receiver"))?;
    let shutdown = CancellationToken::new();
    // The probe moves into its task; its programs are found again by kernel id.
    let ids: Vec<u32> = probe.program_stats().iter().map(|s| s.id).collect();
    let task = rt.spawn(probe.run(shutdown.clone()));
    let counts = rt.spawn(async move {
        let (mut active, mut passive, mut other) = (0u64, 0u64, 0u64);
        while let Some(batch) = rx.recv().await {
            for e in batch {
                if e.netns != netns || e.kind != EventKind::Close {
                    other += 1;
                    continue;
                }
                match e.direction {
                    Direction::Active => active += 1,
                    Direction::Passive => passive += 1,
                }
            }
        }
        (active, passive, other)
    });
    println!("ready");
    wait_for_stdin_eof();
    // Let the last records drain through the ring buffer and both channels.
    std::thread::sleep(Duration::from_millis(500));
    let stats = edgeward::probe::program_stats_by_id(&ids);
    shutdown.cancel();
    rt.block_on(task)?;
    let (active, passive, other) = rt.block_on(counts)?;
    let p = status.snapshot().probe;
    println!(
        "active_closes={active} passive_closes={passive} other_events={other} events={} drops={} {} drop_reasons={:?}",
        p.events,
        p.drops,
        stats_line(&stats),
        p.drop_reasons
    );
    Ok(())
}
