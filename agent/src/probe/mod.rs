//! The eBPF TCP probe: loads edgeward's kernel programs (embedded in the binary at build time),
//! attaches them to kernel tracepoints and reads what they report.
//!
//! Without the privileges or kernel features it needs, the probe reports itself `degraded` with
//! the exact reason and the rest of the agent keeps running.

pub mod event;

use std::time::Duration;

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{ProgramError, TracePoint},
};
use edgeward_common::counter;
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::status::{ProbeState, StatusHandle};

/// The kernel programs, built from `ebpf/edgeward-ebpf` by the agent's build script.
pub static PROGRAMS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edgeward-probes"));

/// `[probe]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Load the eBPF programs. `--no-ebpf` sets this to false.
    pub enabled: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Why the probe could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The binary was built with `AYA_BUILD_SKIP` and carries no kernel programs.
    #[error("this edgeward binary was built without its eBPF programs (AYA_BUILD_SKIP)")]
    NotBuilt,
    /// The object could not be parsed or its maps created.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program is missing from the object.
    #[error("eBPF program `{0}` is missing from the embedded object")]
    MissingProgram(&'static str),
    /// A map is missing or has the wrong type.
    #[error("eBPF map `{name}`: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        source: aya::maps::MapError,
    },
    /// The kernel refused a program (the verifier log is part of the message) or its
    /// tracepoint.
    #[error("eBPF program `{program}` on tracepoint {tracepoint}: {source}")]
    Program {
        /// The program.
        program: &'static str,
        /// `category/name`.
        tracepoint: String,
        /// Why, including the verifier output when the kernel rejected it.
        source: ProgramError,
    },
}

/// Counters the probe exports.
#[derive(Clone, Default)]
struct ProbeMetrics {
    state_changes: Counter,
}

/// A loaded and attached probe. Dropping it detaches the programs.
pub struct Probe {
    ebpf: Ebpf,
    metrics: ProbeMetrics,
    status: StatusHandle,
}

/// Tracepoint programs: (program name, category, tracepoint name).
const TRACEPOINTS: &[(&str, &str, &str)] =
    &[("inet_sock_set_state", "sock", "inet_sock_set_state")];

impl ProbeConfig {
    /// Loads and attaches the probe, or records why it is off or degraded. Never fails the
    /// agent: the error is in the returned `None` and in the status.
    pub fn build(&self, status: &StatusHandle, registry: &mut Registry) -> Option<Probe> {
        let metrics = ProbeMetrics::default();
        registry.register(
            "edgeward_probe_tcp_state_changes",
            "TCP state changes seen by the eBPF probe",
            metrics.state_changes.clone(),
        );
        if !self.enabled {
            tracing::info!("eBPF probe turned off (probe.enabled = false or --no-ebpf)");
            status.update(|s| {
                s.probe.state = ProbeState::Off;
                s.probe.reason = Some("turned off by configuration (--no-ebpf)".to_owned());
            });
            return None;
        }
        match load() {
            Ok(ebpf) => {
                tracing::info!(
                    programs = TRACEPOINTS.len(),
                    "eBPF probe loaded and attached"
                );
                status.update(|s| {
                    s.probe.state = ProbeState::Running;
                    s.probe.reason = None;
                });
                Some(Probe {
                    ebpf,
                    metrics,
                    status: status.clone(),
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "eBPF probe unavailable; running without it");
                status.update(|s| {
                    s.probe.state = ProbeState::Degraded;
                    s.probe.reason = Some(e.to_string());
                });
                None
            }
        }
    }
}

fn load() -> Result<Ebpf, ProbeError> {
    if PROGRAMS.is_empty() {
        return Err(ProbeError::NotBuilt);
    }
    let mut ebpf = Ebpf::load(PROGRAMS)?;
    for &(program, category, name) in TRACEPOINTS {
        let tracepoint: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or(ProbeError::MissingProgram(program))?
            .try_into()
            .map_err(|source| ProbeError::Program {
                program,
                tracepoint: format!("{category}/{name}"),
                source,
            })?;
        let attach = |tp: &mut TracePoint| -> Result<(), ProgramError> {
            tp.load()?;
            tp.attach(category, name)?;
            Ok(())
        };
        attach(tracepoint).map_err(|source| ProbeError::Program {
            program,
            tracepoint: format!("{category}/{name}"),
            source,
        })?;
    }
    Ok(ebpf)
}

impl Probe {
    /// Reads the kernel counters every `interval` until `shutdown`, then detaches.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let counters = match self
            .ebpf
            .map("COUNTERS")
            .map(PerCpuArray::<_, u64>::try_from)
        {
            Some(Ok(map)) => map,
            Some(Err(source)) => {
                let e = ProbeError::Map {
                    name: "COUNTERS",
                    source,
                };
                tracing::error!(error = %e, "eBPF probe counters unreadable");
                self.status.update(|s| {
                    s.probe.state = ProbeState::Degraded;
                    s.probe.reason = Some(e.to_string());
                });
                return;
            }
            None => {
                tracing::error!("eBPF map COUNTERS missing from the embedded object");
                return;
            }
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let total = match counters.get(&counter::STATE_CHANGES, 0) {
                Ok(per_cpu) => per_cpu.iter().sum::<u64>(),
                Err(e) => {
                    tracing::warn!(error = %e, "reading eBPF counters failed");
                    continue;
                }
            };
            self.metrics
                .state_changes
                .inc_by(total.saturating_sub(last));
            last = total;
            self.status.update(|s| s.probe.events = total);
        }
        tracing::info!("eBPF probe detached");
    }
}
