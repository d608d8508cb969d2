//! The eBPF TCP probe: loads edgeward's kernel programs (embedded in the binary at build time),
//! attaches them to kernel tracepoints (and an fexit trampoline where the kernel allows one),
//! and turns what they report into enriched [`ConnectionEvent`]s. The kernel keeps no state per
//! connection: the reader joins its records in a bounded table (`tracker`), whose sweep
//! announces long-lived connections and has the kernel report their counters when updates are
//! due (`conn_report`, run on demand).
//!
//! Data path: ring buffer reader (never blocks; joins records) → bounded channel → enrichment
//! thread → bounded channel out ([`Probe::take_events`]). Full channel = the batch is dropped
//! and counted. A full ring buffer is counted in a per-CPU map in the kernel, connections the
//! table did not hold by the reader. Every loss shows in `/status` (`probe.drops`) and in
//! metrics.
//!
//! Without the privileges or kernel features it needs, the probe reports itself `degraded` with
//! the exact reason and the rest of the agent keeps running.

pub mod btf;
pub mod decode;
pub mod enrich;
pub mod event;
pub mod existing;
mod lookup;
mod prog_info;
mod tracker;

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, FExit, Iter, ProgramError, RawTracePoint, RawTracePointRunOptions, TestRun,
        TracePoint,
    },
};
use edgeward_common::{HeldSocket, NO_OFFSET, Offsets, counter, report, wanted};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use crate::{
    config::ConfigError,
    pipeline::channel::{self, BatchRx, BatchTx, SendError},
    status::{ProbeState, StatusHandle},
};
use event::ConnectionEvent;

/// The kernel programs, built from `ebpf/edgeward-ebpf` by the agent's build script.
pub static PROGRAMS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edgeward-probes"));

/// `[probe]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Load the eBPF programs. `--no-ebpf` sets this to false.
    pub enabled: bool,
    /// Size of the kernel → agent ring buffer in bytes: a power of two, at least 4096 (one
    /// page). A short connection's records take about 310 bytes in it (both ends).
    pub ring_buffer_bytes: u32,
    /// Connections in flight in the agent's table (about 150 bytes each). When it is full
    /// the oldest is forgotten, and counted as a loss (`untracked`) when it closes.
    pub max_connections: u32,
    /// How often an open connection reports its counters (an `update` event). The agent's
    /// sweep of its table has the kernel read them when they are due, so a
    /// connection is updated whether or not it carries traffic. "0s" turns updates off.
    #[serde(with = "crate::config::serde_duration")]
    pub update_interval: Duration,
    /// A connection's open event waits this long: one that closes sooner is reported with
    /// its open and close together (the cheaper path for short connections); a longer one is
    /// reported by the sweep of the agent's table of connections, which runs at this pace (at
    /// most once a second, more often only when `update_interval` is shorter). "0s" reports
    /// every open as it happens.
    #[serde(with = "crate::config::serde_duration")]
    pub open_delay: Duration,
    /// Capacity of each of the two bounded channels (reader → enrichment → consumer).
    pub channel_capacity: usize,
    /// Entries in each enrichment cache (executables by process, workloads by cgroup).
    pub enrichment_cache_size: usize,
    /// Where the kernel's BTF is read from.
    pub btf_path: PathBuf,
    /// Attach the programs as raw tracepoints when the kernel's BTF gives the socket fields
    /// they read (the cheaper form); false attaches classic tracepoints, which read the
    /// formatted tracepoint record. Both report the same fields.
    pub raw_tracepoints: bool,
    /// With raw tracepoints, attach their BTF-typed form (`tp_btf`) where the kernel allows it:
    /// the same arguments, but the socket's fields are plain loads instead of a helper call
    /// each. False keeps the untyped raw form. Both report the same fields.
    pub typed_tracepoints: bool,
    /// Find the sockets open before the probe with the kernel's `held_sockets` iterator
    /// where it loads (every process and network namespace, without `ptrace` access); false
    /// reads `/proc/PID/fd` and `/proc/PID/ns/net` instead.
    pub socket_iterator: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ring_buffer_bytes: 4 << 20,
            max_connections: 65_536,
            update_interval: Duration::from_secs(30),
            open_delay: Duration::from_secs(1),
            channel_capacity: 16_384,
            enrichment_cache_size: 4_096,
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
            raw_tracepoints: true,
            typed_tracepoints: true,
            socket_iterator: true,
        }
    }
}

impl ProbeConfig {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let rb = self.ring_buffer_bytes;
        if rb < 4096 || !rb.is_power_of_two() || rb > 1 << 30 {
            return Err(ConfigError::invalid(
                "probe.ring_buffer_bytes",
                rb,
                "must be a power of two between 4096 and 1073741824",
            ));
        }
        if !(64..=1 << 24).contains(&self.max_connections) {
            return Err(ConfigError::invalid(
                "probe.max_connections",
                self.max_connections,
                "must be between 64 and 16777216",
            ));
        }
        if !self.update_interval.is_zero() && self.update_interval < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "probe.update_interval",
                humantime::format_duration(self.update_interval),
                "must be \"0s\" (off) or at least 100ms",
            ));
        }
        if self.open_delay > Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "probe.open_delay",
                humantime::format_duration(self.open_delay),
                "must be at most 1h (\"0s\" reports every open at once)",
            ));
        }
        if !(1..=1 << 20).contains(&self.channel_capacity) {
            return Err(ConfigError::invalid(
                "probe.channel_capacity",
                self.channel_capacity,
                "must be between 1 and 1048576",
            ));
        }
        if !(1..=1 << 20).contains(&self.enrichment_cache_size) {
            return Err(ConfigError::invalid(
                "probe.enrichment_cache_size",
                self.enrichment_cache_size,
                "must be between 1 and 1048576",
            ));
        }
        Ok(())
    }
}

/// Why the probe could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The binary was built with `AYA_BUILD_SKIP` and carries no kernel programs.
    #[error("this edgeward binary was built without its eBPF programs (AYA_BUILD_SKIP)")]
    NotBuilt,
    /// The object could not be parsed or its maps created (often: no CAP_BPF).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// The kernel's BTF could not be read (typed tracepoints and the held-sockets iterator
    /// are loaded against it).
    #[error("reading the kernel's BTF: {0}")]
    Btf(String),
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
    /// A map is missing from the object.
    #[error("eBPF map `{0}` is missing from the embedded object")]
    MissingMap(&'static str),
    /// The kernel refused a program (the verifier log is part of the message) or its
    /// attach point.
    #[error("eBPF program `{program}` on {attach_point}: {source}{}", empty_log_note(.source))]
    Program {
        /// The program.
        program: &'static str,
        /// `category/name` of the tracepoint, or the traced kernel function.
        attach_point: String,
        /// Why, including the verifier output when the kernel rejected it.
        source: ProgramError,
    },
    /// `conn_report`, run on no connection at start, did not answer "gone".
    #[error(
        "eBPF program `conn_report` answered {0} for no connection (expected {gone})",
        gone = report::GONE
    )]
    ReportCheck(u32),
    /// The `held_sockets` iterator ran but its output could not be read.
    #[error("reading the sockets held by processes (iterator `held_sockets`): {0}")]
    Iter(String),
    /// The ring buffer could not be registered with the async runtime.
    #[error("polling the eBPF ring buffer: {0}")]
    Poll(std::io::Error),
}

/// What a program error needs added: aya ends a load error with the verifier's log, which is
/// empty when the kernel refused the program before verifying it (a missing privilege, a
/// security module), and would leave "Verifier output:" with nothing after it.
fn empty_log_note(e: &ProgramError) -> &'static str {
    match e {
        ProgramError::LoadError { verifier_log, .. }
            if verifier_log.to_string().trim().is_empty() =>
        {
            "(empty: the kernel refused the program before the verifier ran)"
        }
        _ => "",
    }
}

/// The error and its sources on one line (aya's map and program errors keep the errno in
/// their source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// A tracepoint the probe attaches to.
struct Hook {
    /// The program in classic form (given the tracepoint's formatted record).
    classic: &'static str,
    /// The same program in raw form (given the tracepoint's arguments).
    raw: &'static str,
    /// The same program in BTF-typed form, where it has one (the raw form's arguments, typed).
    typed: Option<&'static str>,
    /// The benchmark floor's counting programs for this tracepoint (classic, raw, typed).
    floor: (&'static str, &'static str, Option<&'static str>),
    category: &'static str,
    name: &'static str,
    /// What is lost without it; `None` = required.
    loses: Option<&'static str>,
}

const STATE_HOOK: Hook = Hook {
    classic: "conn_state",
    raw: "conn_state_raw",
    typed: Some("conn_state_typed"),
    floor: (
        "count_state_changes",
        "count_state_changes_raw",
        Some("count_state_changes_typed"),
    ),
    category: "sock",
    name: "inet_sock_set_state",
    loses: None,
};

/// Needed only where BTF does not give `tcp_sock.total_retrans`: a run per retransmitted
/// segment, to count what the close record would otherwise read.
const RETRANSMIT_HOOK: Hook = Hook {
    classic: "conn_retransmit",
    raw: "conn_retransmit_raw",
    typed: None,
    floor: ("count_other", "count_other_raw", None),
    category: "tcp",
    name: "tcp_retransmit_skb",
    loses: Some("retransmits (without BTF)"),
};

/// The tracepoints the probe needs on a kernel with these offsets.
fn hooks(offsets: &Offsets) -> impl Iterator<Item = &'static Hook> {
    let retransmits = offsets.total_retrans == NO_OFFSET;
    [&STATE_HOOK, &RETRANSMIT_HOOK]
        .into_iter()
        .filter(move |hook| hook.name != RETRANSMIT_HOOK.name || retransmits)
}

/// How the programs attach to their tracepoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// BTF-enabled tracepoints (`tp_btf`): the raw form's arguments, with the socket a typed
    /// pointer whose fields the program loads directly. The cheapest form; needs BTF and a
    /// kernel that lets tracing programs load. Hooks without a typed program attach raw.
    Typed,
    /// Raw tracepoints: the kernel passes the tracepoint's arguments (the socket pointer)
    /// without formatting a record first. The cheaper form; needs the socket's address
    /// fields from BTF.
    Raw,
    /// Classic tracepoints: the programs read the formatted record. For kernels without BTF.
    Classic,
}

impl AttachMode {
    /// The cheapest form the offsets allow.
    pub fn for_offsets(offsets: &Offsets) -> Self {
        if offsets.has_sock_addresses() {
            Self::Typed
        } else {
            Self::Classic
        }
    }

    /// The next form to try when this one cannot be loaded.
    fn fallback(self) -> Option<Self> {
        match self {
            Self::Typed => Some(Self::Raw),
            Self::Raw => Some(Self::Classic),
            Self::Classic => None,
        }
    }

    /// Runs `attempt` in this form and, while it fails, in each form after it; `failed` hears
    /// of every failure that leaves a form to try. The first success with its form, or the
    /// last form's error.
    fn try_each<T>(
        self,
        mut attempt: impl FnMut(Self) -> Result<T, ProbeError>,
        mut failed: impl FnMut(Self, Self, &ProbeError),
    ) -> Result<(T, Self), ProbeError> {
        let mut mode = self;
        loop {
            match attempt(mode) {
                Err(e) if let Some(next) = mode.fallback() => {
                    failed(mode, next, &e);
                    mode = next;
                }
                result => return result.map(|t| (t, mode)),
            }
        }
    }

    /// The form `hook` is attached in: typed only where it has a typed program.
    fn for_hook(self, hook: &Hook) -> Self {
        match self {
            Self::Typed if hook.typed.is_none() => Self::Raw,
            mode => mode,
        }
    }

    fn program(self, hook: &Hook) -> &'static str {
        match self.for_hook(hook) {
            Self::Typed => hook.typed.unwrap_or(hook.raw),
            Self::Raw => hook.raw,
            Self::Classic => hook.classic,
        }
    }

    fn floor(self, hook: &Hook) -> &'static str {
        match self.for_hook(hook) {
            Self::Typed => hook.floor.2.unwrap_or(hook.floor.1),
            Self::Raw => hook.floor.1,
            Self::Classic => hook.floor.0,
        }
    }

    /// As logs and docs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Typed => "tp_btf",
            Self::Raw => "raw_tracepoint",
            Self::Classic => "tracepoint",
        }
    }
}

/// How often the reader drains the ring buffer without being woken (the kernel wakes it only
/// once an eighth of the buffer is filled): the most an event waits in the kernel.
const READ_PERIOD: Duration = Duration::from_millis(50);

/// The fexit program that attributes passive opens to the accepting process.
const ACCEPT_PROGRAM: &str = "conn_accept";
const ACCEPT_FUNCTION: &str = "inet_csk_accept";
/// What is lost without the accept hook.
const PASSIVE_UNTIL_CLOSE: &str = "pid/comm of the accepting process of a passive open: the listener's owner is reported, or for an unknown listener the closing process";

/// What is lost when the sockets of connections found in /proc cannot all be looked up.
const NO_UPDATES_BEFORE: &str =
    "update events of connections open before the probe whose socket addresses /proc/net/tcp hides";

/// What is lost when the start-up scan of /proc may not read some processes.
const UNREADABLE_PROCESSES: &str = "listeners and connections open before the probe in processes the agent may not read in /proc (CAP_SYS_PTRACE): passive opens on those listeners get an owner only at close; those connections are reported without their process in the agent's own network namespace, and not at all in namespaces where it can read no process";

/// The iterator that lists the TCP sockets processes hold, at start.
const HELD_SOCKETS_PROGRAM: &str = "held_sockets";

/// What is lost when, with the kernel's list of held sockets, the TCP table of a network
/// namespace could not be found in /proc.
const UNREADABLE_NAMESPACES: &str = "connections open before the probe in network namespaces whose TCP table no process holding their sockets shows in /proc/PID/net/tcp";

/// The program the sweep runs (`BPF_PROG_TEST_RUN`) to have a connection's report written:
/// its addresses and handshake state before its open is announced, its counters for updates.
const REPORT_PROGRAM: &str = "conn_report";
/// What is lost when the kernel cannot run it.
const NO_UPDATES: &str = "update events of open connections";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// Loss reasons, as `reason` label values and `/status` `probe.drop_reasons` keys.
pub mod drop_reason {
    /// The kernel could not reserve ring buffer space.
    pub const RING_BUFFER_FULL: &str = "ring_buffer_full";
    /// A connection closed that the agent's table of connections in flight did not hold:
    /// evicted while open (more than `max_connections` in flight), older than the probe, or
    /// whose start record was lost.
    pub const UNTRACKED: &str = "untracked";
    /// The reader → enrichment channel was full.
    pub const READER_CHANNEL_FULL: &str = "reader_channel_full";
    /// The enrichment → consumer channel was full.
    pub const OUTPUT_CHANNEL_FULL: &str = "output_channel_full";
    /// A ring buffer record did not decode.
    pub const UNDECODABLE: &str = "undecodable";
    /// The kernel skipped a run of a probe program because one was already running on that
    /// CPU (a state change in an interrupt that arrived while the probe ran): the record that
    /// run would have written, if any, is lost. Counts skipped runs, an upper bound on lost
    /// records.
    pub const NESTED_RUN_SKIPPED: &str = "nested_run_skipped";
}

/// Losses counted in userspace.
#[derive(Debug, Default)]
struct UserDrops {
    /// Kept by the reader's tracker ([`tracker::Tracker::untracked`]).
    untracked: AtomicU64,
    reader_full: AtomicU64,
    output_full: AtomicU64,
    undecodable: AtomicU64,
    read: AtomicU64,
}

/// A loaded and attached probe. Dropping it detaches the programs.
pub struct Probe {
    /// Kept alive: dropping it detaches the programs.
    ebpf: Ebpf,
    ring: Option<RingBuf<MapData>>,
    /// The switches of records the agent wants (`wanted`).
    wanted: Option<Array<MapData, u32>>,
    /// What the switches were last set to.
    owners_wanted: bool,
    /// The kernel runs `conn_report` for the sweep.
    reports: bool,
    /// The kernel's records carry network namespaces (BTF has `sk_net` and `net.ns.inum`).
    netns_known: bool,
    /// The listeners and connections found in /proc at start, for the tracker; and when
    /// (kernel monotonic clock).
    existing: existing::Existing,
    found_ns: u64,
    /// Where the cgroup v2 hierarchy is mounted: the scan and the enrichment look cgroup ids
    /// up there.
    cgroup_root: PathBuf,
    counters: PerCpuArray<MapData, u64>,
    config: ProbeConfig,
    out_tx: Option<BatchTx<ConnectionEvent>>,
    out_rx: Option<BatchRx<ConnectionEvent>>,
    drops: Arc<UserDrops>,
    status: StatusHandle,
    missing: Vec<&'static str>,
    metrics: Option<ProbeMetrics>,
    /// A failed `conn_report` run was logged (then only counted by its absence).
    warned_report: bool,
    /// A failed read of the skipped-run count was logged.
    warned_nested: bool,
}

#[derive(Clone, Default)]
struct ProbeMetrics {
    state_changes: Counter,
    events: Counter,
    drops: Family<DropLabels, Counter>,
}

impl ProbeConfig {
    /// Loads and attaches the probe, or records why it is off or degraded. Never fails the
    /// agent: the error is in the returned `None` and in the status. Registers the probe's
    /// metrics either way.
    pub fn build(&self, status: &StatusHandle, registry: &mut Registry) -> Option<Probe> {
        let metrics = ProbeMetrics::default();
        registry.register(
            "edgeward_probe_tcp_state_changes",
            "TCP state changes seen by the eBPF probe",
            metrics.state_changes.clone(),
        );
        registry.register(
            "edgeward_probe_events",
            "Connection events read from the eBPF ring buffer",
            metrics.events.clone(),
        );
        registry.register(
            "edgeward_probe_drops",
            "Connection events lost, by reason",
            metrics.drops.clone(),
        );
        if !self.enabled {
            tracing::info!("eBPF probe turned off (probe.enabled = false or --no-ebpf)");
            status.update(|s| {
                s.probe.state = ProbeState::Off;
                s.probe.reason = Some("turned off by configuration (--no-ebpf)".to_owned());
            });
            return None;
        }
        match self.start(status) {
            Ok(mut probe) => {
                probe.metrics = Some(metrics);
                Some(probe)
            }
            Err(e) => {
                let mut reason = error_chain(&e);
                if reason.contains("Operation not permitted") {
                    reason.push_str(
                        " (the probe needs CAP_BPF and CAP_PERFMON, or root; see docs/probe.md)",
                    );
                }
                tracing::error!(error = %reason, "eBPF probe unavailable; running without it");
                status.update(|s| {
                    s.probe.state = ProbeState::Degraded;
                    s.probe.reason = Some(reason);
                });
                None
            }
        }
    }

    /// Loads and attaches the probe and sets `probe.state` in `status`: `running` (with
    /// `missing_fields` naming what the missing accept hook costs, if anything), or
    /// `degraded` with the missing fields when the kernel lacks BTF or an optional
    /// tracepoint.
    pub fn start(&self, status: &StatusHandle) -> Result<Probe, ProbeError> {
        if PROGRAMS.is_empty() {
            return Err(ProbeError::NotBuilt);
        }
        let (mut offsets, mut missing, mut notes) = match btf::kernel_offsets(&self.btf_path) {
            Ok(k) => (k.offsets, k.missing_fields, Vec::new()),
            Err(e) => {
                tracing::warn!(error = %e, "no kernel BTF; the probe reports fewer fields");
                (Offsets::UNKNOWN, btf::all_btf_fields(), vec![e.to_string()])
            }
        };
        // Wake the reader at an eighth of the buffer; it drains every READ_PERIOD anyway.
        offsets.wakeup_bytes = u64::from(self.ring_buffer_bytes / 8);
        offsets.open_delay_ns = u64::try_from(self.open_delay.as_nanos()).unwrap_or(u64::MAX);
        let first = match AttachMode::for_offsets(&offsets) {
            _ if !self.raw_tracepoints => AttachMode::Classic,
            AttachMode::Typed if !self.typed_tracepoints => AttachMode::Raw,
            mode => mode,
        };
        let ((mut ebpf, lost, btf), mode) = first.try_each(
            |mode| self.load_and_attach(&offsets, mode),
            |mode, next, e| {
                // Typed tracepoints are refused by kernels that allow no tracing programs
                // (some hardened ones); that costs some CPU, nothing of what is reported.
                let e = error_chain(e);
                if mode != AttachMode::Typed {
                    tracing::warn!(error = %e, from = mode.as_str(), to = next.as_str(), "tracepoint form unavailable; trying the next");
                } else {
                    tracing::info!(error = %e, from = mode.as_str(), to = next.as_str(), "tracepoint form unavailable; trying the next");
                }
            },
        )?;
        for (e, loses) in lost {
            notes.push(e);
            missing.push(loses);
        }
        let found_ns = decode::monotonic_ns();
        let held = self.held_sockets(&mut ebpf, &offsets, btf);
        let cgroup_root = enrich::cgroup2_root();
        let mut existing =
            scan_existing(self.max_connections as usize, held.as_deref(), &cgroup_root);
        // The sweep has the kernel report on connections: a kernel that cannot run that
        // program on demand (BPF_PROG_TEST_RUN of raw tracepoints, Linux 5.10) gives no
        // updates.
        let mut reports = false;
        if self.sweep_period().is_some() {
            match load_report(&mut ebpf) {
                Ok(()) => reports = true,
                Err(e) => {
                    let e = error_chain(&e);
                    tracing::warn!(error = %e, "connection reports unavailable: no update events");
                    notes.push(e);
                    if !self.update_interval.is_zero() {
                        missing.push(NO_UPDATES);
                    }
                }
            }
        }
        let lookup_lost = if reports && existing.connections.iter().any(|c| c.sk.is_none()) {
            find_sockets(&mut ebpf, &mut existing.connections)
        } else {
            None
        };
        let degraded = !missing.is_empty();
        // None of what follows degrades the probe. Processes the scan of /proc may not read,
        // and sockets it may not look up, hide only what was open before the probe; from now
        // on it sees everything.
        if existing.unreadable > 0 {
            missing.push(if held.is_some() {
                UNREADABLE_NAMESPACES
            } else {
                UNREADABLE_PROCESSES
            });
        }
        if lookup_lost.is_some() {
            missing.push(NO_UPDATES_BEFORE);
        }
        // The accept hook is an improvement, not a requirement: without it a passive open is
        // attributed to the owner of its listener (or, that unknown, to the closing process).
        let accept_hook = attach_accept(&mut ebpf).map_err(|e| error_chain(&e));
        if let Err(e) = &accept_hook {
            tracing::info!(error = %e, "accept hook unavailable; passive opens are attributed to the owner of their listener");
            missing.push(PASSIVE_UNTIL_CLOSE);
        }
        let ring = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or(ProbeError::MissingMap("EVENTS"))?,
        )
        .map_err(|source| ProbeError::Map {
            name: "EVENTS",
            source,
        })?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .ok_or(ProbeError::MissingMap("COUNTERS"))?,
        )
        .map_err(|source| ProbeError::Map {
            name: "COUNTERS",
            source,
        })?;
        let mut wanted = ebpf
            .take_map("WANTED")
            .and_then(|m| Array::try_from(m).ok());
        // Without reports the agent learns an active open's final addresses from the kernel
        // at the end of the handshake.
        if !reports
            && let Some(w) = wanted.as_mut()
            && let Err(e) = w.set(wanted::ESTABLISHED, 1, 0)
        {
            tracing::warn!(error = %e, "cannot switch on handshake records; long-lived active opens are reported without their local port");
        }
        let (out_tx, out_rx) = channel::bounded(self.channel_capacity);
        let mut missing_text: Vec<String> = missing.iter().map(|s| (*s).to_owned()).collect();
        if let Some(why) = &lookup_lost
            && let Some(text) = missing_text.iter_mut().find(|t| *t == NO_UPDATES_BEFORE)
        {
            *text = format!("{text} ({why})");
        }
        if let (Err(e), Some(last)) = (&accept_hook, missing_text.last_mut()) {
            *last = format!("{last} (fexit {ACCEPT_FUNCTION} unavailable: {e})");
        }
        status.update(|s| {
            s.probe.missing_fields = missing_text.clone();
            if degraded {
                s.probe.state = ProbeState::Degraded;
                s.probe.reason = Some(format!(
                    "running with missing fields [{}]: {}",
                    missing_text.join("; "),
                    notes.join("; ")
                ));
            } else {
                s.probe.state = ProbeState::Running;
                s.probe.reason = None;
            }
        });
        tracing::info!(
            tracepoints = hooks(&offsets).count(),
            attach = mode.as_str(),
            missing = missing.len(),
            "eBPF probe loaded and attached"
        );
        Ok(Probe {
            ebpf,
            ring: Some(ring),
            wanted,
            owners_wanted: false,
            reports,
            netns_known: offsets.sk_net != NO_OFFSET && offsets.net_inum != NO_OFFSET,
            existing,
            found_ns,
            cgroup_root,
            counters,
            config: self.clone(),
            out_tx: Some(out_tx),
            out_rx: Some(out_rx),
            drops: Arc::default(),
            status: status.clone(),
            missing,
            metrics: None,
            warned_report: false,
            warned_nested: false,
        })
    }
}

impl ProbeConfig {
    /// How often the agent sweeps its table of connections: at the pace of `open_delay`
    /// but at most once a second, or of `update_interval` when that is shorter; `None` when
    /// neither needs a sweep.
    fn sweep_period(&self) -> Option<Duration> {
        let opens =
            (!self.open_delay.is_zero()).then(|| self.open_delay.max(Duration::from_secs(1)));
        let updates = (!self.update_interval.is_zero()).then_some(self.update_interval);
        opens.into_iter().chain(updates).min()
    }

    /// Loads the programs and attaches them in `mode`. Returns the optional tracepoints that
    /// failed, each with the error and what it costs, and the kernel's BTF when `mode` needed
    /// it (for the held-sockets iterator, which needs it too).
    #[allow(clippy::type_complexity)]
    fn load_and_attach(
        &self,
        offsets: &Offsets,
        mode: AttachMode,
    ) -> Result<(Ebpf, Vec<(String, &'static str)>, Option<Btf>), ProbeError> {
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", offsets, true)
            .map_max_entries("EVENTS", self.ring_buffer_bytes)
            .load(PROGRAMS)?;
        // Parsed after the object is loaded, whose temporaries are freed by then: the parsed
        // BTF is the largest allocation of the agent's life, and the two at once set its peak
        // RSS.
        let btf = self.btf_for(mode)?;
        let mut lost = Vec::new();
        for hook in hooks(offsets) {
            let program = mode.program(hook);
            match (
                attach_tracepoint(&mut ebpf, mode, program, hook, btf.as_ref()),
                hook.loses,
            ) {
                (Ok(()), _) => {}
                (Err(e), None) => return Err(e),
                (Err(e), Some(loses)) => {
                    tracing::warn!(error = %error_chain(&e), "optional tracepoint unavailable");
                    lost.push((error_chain(&e), loses));
                }
            }
        }
        Ok((ebpf, lost, btf))
    }

    /// Every TCP socket a process holds, with its network namespace, from the
    /// `held_sockets` iterator: what `/proc/PID/fd` and `/proc/PID/ns/net` say to a reader
    /// with `ptrace` access to every process, which the agent usually lacks. `None` where the
    /// kernel (BTF, iterators, tracing programs) does not allow it: then /proc is read. `btf`
    /// is the kernel's BTF if it was parsed already.
    fn held_sockets(
        &self,
        ebpf: &mut Ebpf,
        offsets: &Offsets,
        btf: Option<Btf>,
    ) -> Option<Vec<HeldSocket>> {
        if !self.socket_iterator {
            return None;
        }
        // The iterator names processes by their pid in the initial PID namespace, and the
        // agent looks them up in its /proc: the two agree only in that namespace (the
        // DaemonSet's hostPID, or a service on the host).
        if !in_initial_pid_namespace() {
            tracing::info!(
                "the agent runs in a PID namespace of its own; reading /proc for the sockets open before the probe"
            );
            return None;
        }
        if !offsets.has_held_sockets() {
            tracing::info!(
                "kernel BTF lacks the fields of the held-sockets iterator; reading /proc for the sockets open before the probe"
            );
            return None;
        }
        let started = std::time::Instant::now();
        match self.run_held_sockets(ebpf, btf) {
            Ok(held) => {
                tracing::debug!(sockets = held.len(), took = ?started.elapsed(), "sockets held by processes listed by the kernel");
                Some(held)
            }
            Err(e) => {
                tracing::info!(error = %error_chain(&e), "held-sockets iterator unavailable; reading /proc for the sockets open before the probe");
                None
            }
        }
    }

    fn run_held_sockets(
        &self,
        ebpf: &mut Ebpf,
        btf: Option<Btf>,
    ) -> Result<Vec<HeldSocket>, ProbeError> {
        let err = |source| ProbeError::Program {
            program: HELD_SOCKETS_PROGRAM,
            attach_point: "iterator task_file".to_owned(),
            source,
        };
        let btf = match btf {
            Some(btf) => btf,
            None => self.parse_btf()?,
        };
        let prog: &mut Iter = program_as(ebpf, HELD_SOCKETS_PROGRAM, err)?;
        prog.load("task_file", &btf).map_err(err)?;
        let link = prog.attach().map_err(err)?;
        let mut file = prog
            .take_link(link)
            .map_err(err)?
            .into_file()
            .map_err(|e| ProbeError::Iter(e.to_string()))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes)
            .map_err(|e| ProbeError::Iter(e.to_string()))?;
        // The program is needed no more: its fd closes with it.
        let _ = prog.unload();
        Ok(held_records(&bytes))
    }

    /// The kernel's BTF, which typed tracepoints are loaded against; `None` for other forms.
    fn btf_for(&self, mode: AttachMode) -> Result<Option<Btf>, ProbeError> {
        if mode != AttachMode::Typed {
            return Ok(None);
        }
        self.parse_btf().map(Some)
    }

    /// The kernel's BTF, parsed by aya (for loading programs against it).
    fn parse_btf(&self) -> Result<Btf, ProbeError> {
        Btf::parse_file(&self.btf_path, Endianness::default())
            .map_err(|e| ProbeError::Btf(format!("{}: {e}", self.btf_path.display())))
    }
}

/// Loads `program` (once) and attaches it to `hook`'s tracepoint in `mode`.
fn attach_tracepoint(
    ebpf: &mut Ebpf,
    mode: AttachMode,
    program: &'static str,
    hook: &Hook,
    btf: Option<&Btf>,
) -> Result<(), ProbeError> {
    let mode = mode.for_hook(hook);
    let (category, name) = (hook.category, hook.name);
    let err = |source| ProbeError::Program {
        program,
        attach_point: format!("{} {category}/{name}", mode.as_str()),
        source,
    };
    let prog = ebpf
        .program_mut(program)
        .ok_or(ProbeError::MissingProgram(program))?;
    match mode {
        AttachMode::Classic => {
            let tp: &mut TracePoint = prog.try_into().map_err(err)?;
            if tp.fd().is_err() {
                tp.load().map_err(err)?;
            }
            tp.attach(category, name).map_err(err)?;
        }
        AttachMode::Raw => {
            let tp: &mut RawTracePoint = prog.try_into().map_err(err)?;
            if tp.fd().is_err() {
                tp.load().map_err(err)?;
            }
            tp.attach(name).map_err(err)?;
        }
        AttachMode::Typed => {
            let tp: &mut BtfTracePoint = prog.try_into().map_err(err)?;
            if tp.fd().is_err() {
                let btf = btf.ok_or_else(|| ProbeError::Btf("not read".to_owned()))?;
                tp.load(name, btf).map_err(err)?;
            }
            tp.attach().map_err(err)?;
        }
    }
    Ok(())
}

/// The listeners and connections open before the probe, from /proc (at most `limit`
/// connection ends): the tracker attributes passive opens on those listeners from the
/// handshake on, and adopts those connections.
fn scan_existing(
    limit: usize,
    held: Option<&[HeldSocket]>,
    cgroup_root: &Path,
) -> existing::Existing {
    let found = existing::scan(Path::new("/proc"), cgroup_root, limit, held);
    let with_address = found.connections.iter().filter(|c| c.sk.is_some()).count();
    tracing::info!(
        source = if held.is_some() {
            "kernel iterator and /proc/PID/net/tcp"
        } else {
            "/proc"
        },
        listeners = found.listeners.len(),
        connections = found.connections.len(),
        with_socket_address = with_address,
        over_limit = found.over_limit,
        "sockets open before the probe found"
    );
    if with_address < found.connections.len() {
        tracing::info!(
            "/proc/net/tcp hides socket addresses (kernel.kptr_restrict, or no CAP_SYSLOG); \
             the probe looks the connections up by their addresses (docs/probe.md)"
        );
    }
    if let (Some(error), Some(_)) = (&found.unreadable_error, held) {
        tracing::warn!(
            namespaces = found.unreadable,
            first = %error,
            "cannot find the TCP table of some network namespaces in /proc: their connections \
             open before the probe are unknown (docs/probe.md)"
        );
    } else if let Some(error) = &found.unreadable_error {
        tracing::warn!(
            processes = found.unreadable,
            first = %error,
            "cannot read the namespaces and sockets of some processes in /proc (that takes \
             CAP_SYS_PTRACE, or the same uid and no capability the agent lacks): the owners of \
             their listeners and connections open before the probe are unknown, and so are \
             those connections in network namespaces where the agent can read no process \
             (docs/probe.md)"
        );
    }
    if found.over_limit > 0 {
        tracing::warn!(
            left_out = found.over_limit,
            max_connections = limit,
            "more connections open at start than probe.max_connections; the rest are not reported"
        );
    }
    found
}

/// Whether this process is in the initial PID namespace (whose inode number is fixed).
fn in_initial_pid_namespace() -> bool {
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    std::fs::metadata("/proc/self/ns/pid")
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == PROC_PID_INIT_INO)
}

/// The records the `held_sockets` iterator wrote (`HeldSocket`, in the machine's byte
/// order); a partial record at the end is dropped.
fn held_records(bytes: &[u8]) -> Vec<HeldSocket> {
    let u64_at = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap());
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap());
    bytes
        .chunks_exact(std::mem::size_of::<HeldSocket>())
        .map(|b| HeldSocket {
            sk: u64_at(b, 0),
            inode: u64_at(b, 8),
            tgid: u32_at(b, 16),
            netns: u32_at(b, 20),
            cgroup_id: u64_at(b, 24),
        })
        .collect()
}

/// The program `name` of the object, as its type `P`, for loading; `err` phrases the error
/// when it is of another type (with the attach point, as for the caller's later steps).
pub(crate) fn program_as<'e, P>(
    ebpf: &'e mut Ebpf,
    name: &'static str,
    err: impl Fn(ProgramError) -> ProbeError,
) -> Result<&'e mut P, ProbeError>
where
    &'e mut P: TryFrom<&'e mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProbeError::MissingProgram(name))?
        .try_into()
        .map_err(err)
}

/// How a failure of `program`, one the agent runs on demand (`BPF_PROG_TEST_RUN`) and never
/// attaches, reads.
pub(crate) fn on_demand_error(program: &'static str) -> impl Fn(ProgramError) -> ProbeError + Copy {
    move |source| ProbeError::Program {
        program,
        attach_point: "BPF_PROG_TEST_RUN".to_owned(),
        source,
    }
}

/// Loads `conn_report` and runs it once on no connection, which it must answer "gone": the
/// kernel runs it on demand.
fn load_report(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let err = on_demand_error(REPORT_PROGRAM);
    let prog: &mut RawTracePoint = program_as(ebpf, REPORT_PROGRAM, err)?;
    prog.load().map_err(err)?;
    match run_report(prog, 0).map_err(err)? {
        report::GONE => Ok(()),
        other => Err(ProbeError::ReportCheck(other)),
    }
}

/// Looks up the sockets of the connections found in /proc without their kernel address, for
/// them to be reported on like any other (see [`lookup`]); says why, if some could not be
/// looked up.
fn find_sockets(ebpf: &mut Ebpf, connections: &mut [existing::Connection]) -> Option<String> {
    let without = connections.iter().filter(|c| c.sk.is_none()).count();
    if let Err(e) = lookup::load(ebpf) {
        let e = error_chain(&e);
        tracing::warn!(error = %e, connections = without, "socket lookup unavailable; connections open before the probe get no updates");
        return Some(format!("socket lookup unavailable: {e}"));
    }
    let Some(prog) = lookup::Lookup::of(ebpf) else {
        return Some(format!(
            "socket lookup unavailable: no program {} or map in the object",
            lookup::PROGRAM
        ));
    };
    let found = lookup::find_sockets(&prog, connections);
    for (netns, why) in &found.unreachable {
        tracing::debug!(netns, reason = %why, "cannot look up the sockets of a network namespace");
    }
    if let Some((netns, why)) = found.unreachable.first() {
        tracing::warn!(
            namespaces = found.unreachable.len(),
            first = netns,
            reason = %why,
            "cannot look up sockets in some network namespaces; their connections open before the probe get no updates"
        );
    }
    tracing::info!(
        found = found.found,
        not_found = found.not_found,
        namespaces_unreachable = found.unreachable.len(),
        "sockets of the connections open before the probe looked up by address"
    );
    found.unreachable.first().map(|(netns, why)| {
        format!(
            "sockets not looked up in {} network namespace(s), first {netns}: {why}",
            found.unreachable.len()
        )
    })
}

/// Has the kernel write a report record for the socket at `sk`; returns a [`report`] code.
fn run_report(prog: &RawTracePoint, sk: u64) -> Result<u32, ProgramError> {
    let mut opts = RawTracePointRunOptions::new();
    opts.args[0] = sk;
    Ok(prog.test_run(opts)?.return_value)
}

fn attach_accept(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let err = |source| ProbeError::Program {
        program: ACCEPT_PROGRAM,
        attach_point: format!("fexit {ACCEPT_FUNCTION}"),
        source,
    };
    let btf = aya::Btf::from_sys_fs().map_err(|e| err(ProgramError::Btf(e)))?;
    let prog: &mut FExit = program_as(ebpf, ACCEPT_PROGRAM, err)?;
    prog.load(ACCEPT_FUNCTION, &btf).map_err(err)?;
    prog.attach().map_err(err)?;
    Ok(())
}

/// The benchmark's floor: minimal programs on the same tracepoints as the probe, attached the
/// same way. `count_state_changes` counts TCP state changes on `sock:inet_sock_set_state`;
/// `count_other` counts runs of `tcp:tcp_retransmit_skb` where the probe needs it. No maps besides
/// the per-CPU counters, no ring buffer traffic, no userspace work: what any design on these
/// tracepoints pays at least.
pub struct FloorProbe {
    ebpf: Ebpf,
}

impl FloorProbe {
    /// Loads the object and attaches the counting programs to the probe's tracepoints.
    pub fn attach() -> Result<Self, ProbeError> {
        if PROGRAMS.is_empty() {
            return Err(ProbeError::NotBuilt);
        }
        // The same attach mode as the probe would use here: the floor of the design in use.
        let offsets = btf::kernel_offsets(&ProbeConfig::default().btf_path)
            .map(|k| k.offsets)
            .unwrap_or(Offsets::UNKNOWN);
        let config = ProbeConfig::default();
        let (ebpf, _) = AttachMode::for_offsets(&offsets).try_each(
            |mode| {
                let btf = config.btf_for(mode)?;
                let mut ebpf = EbpfLoader::new()
                    .override_global("OFFSETS", &offsets, true)
                    .load(PROGRAMS)?;
                for hook in hooks(&offsets) {
                    attach_tracepoint(&mut ebpf, mode, mode.floor(hook), hook, btf.as_ref())?;
                }
                Ok(ebpf)
            },
            |_, _, _| {},
        )?;
        Ok(Self { ebpf })
    }

    /// Run counts and kernel run time of its programs (zero unless the kernel's BPF
    /// statistics are enabled, `aya::sys::enable_stats`).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        program_stats(&self.ebpf)
    }

    /// TCP state changes counted so far.
    pub fn state_changes(&self) -> u64 {
        self.ebpf
            .map("COUNTERS")
            .and_then(|m| PerCpuArray::<_, u64>::try_from(m).ok())
            .and_then(|a| a.get(&counter::STATE_CHANGES, 0).ok())
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

/// How often a kernel program ran and for how long in total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    /// The program's name.
    pub name: String,
    /// The kernel's id of the program.
    pub id: u32,
    /// Runs.
    pub run_count: u64,
    /// Total run time, nanoseconds.
    pub run_time_ns: u64,
}

/// Run statistics of the loaded programs of `ebpf`. The kernel only keeps them while
/// statistics are enabled (`aya::sys::enable_stats`); otherwise they read 0.
fn program_stats(ebpf: &Ebpf) -> Vec<ProgramStats> {
    ebpf.programs()
        .filter_map(|(name, program)| {
            let info = program.info().ok()?;
            Some(ProgramStats {
                name: name.to_owned(),
                id: info.id(),
                run_count: info.run_count(),
                run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            })
        })
        .collect()
}

/// Current statistics of the programs with the given kernel ids (for reading them while a
/// [`Probe`] runs in its task).
pub fn program_stats_by_id(ids: &[u32]) -> Vec<ProgramStats> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| ids.contains(&info.id()))
        .map(|info| ProgramStats {
            name: info.name_as_str().unwrap_or("?").to_owned(),
            id: info.id(),
            run_count: info.run_count(),
            run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        })
        .collect()
}

/// Totals of the kernel's per-CPU counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// TCP state changes seen.
    pub state_changes: u64,
    /// Records written to the ring buffer.
    pub events: u64,
    /// Records lost to a full ring buffer.
    pub ring_buffer_full: u64,
}

impl Probe {
    /// The enriched events, in batches (for each batch of up to 1024 records read from the
    /// ring buffer, its events: a record can bring two, a close and its open). Returns `None`
    /// after the first call.
    pub fn take_events(&mut self) -> Option<BatchRx<ConnectionEvent>> {
        self.out_rx.take()
    }

    /// Run counts and kernel run time of its programs (zero unless the kernel's BPF
    /// statistics are enabled, `aya::sys::enable_stats`).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        program_stats(&self.ebpf)
    }

    /// Runs of the probe's programs that the kernel skipped because one was already running
    /// on the same CPU ([`drop_reason::NESTED_RUN_SKIPPED`]), summed over its programs.
    /// Errors when the kernel's count cannot be read for one of them.
    pub fn nested_runs_skipped(&self) -> std::io::Result<u64> {
        let mut total = 0;
        for (_, program) in self.ebpf.programs() {
            // Programs that were not loaded (the accept hook on a kernel without tracing
            // programs) have no fd and never run.
            if let Ok(fd) = program.fd() {
                total += prog_info::recursion_misses(fd.as_fd())?;
            }
        }
        Ok(total)
    }

    /// Event fields this kernel cannot give (empty when everything is available).
    pub fn missing_fields(&self) -> &[&'static str] {
        &self.missing
    }

    /// Sums the kernel's per-CPU counters.
    pub fn kernel_counters(&self) -> KernelCounters {
        let sum = |slot: u32| -> u64 {
            self.counters
                .get(&slot, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            state_changes: sum(counter::STATE_CHANGES),
            events: sum(counter::EVENTS),
            ring_buffer_full: sum(counter::RINGBUF_FULL),
        }
    }

    /// Reads the ring buffer until `shutdown`, hands events to the enrichment thread, and
    /// publishes counters every second. Detaches the programs when it returns.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let (Some(ring), Some(out_tx)) = (self.ring.take(), self.out_tx.take()) else {
            return;
        };
        let (raw_tx, raw_rx) = channel::bounded(self.config.channel_capacity);
        let mut raw_tx = BatchSender::new(raw_tx, self.drops.clone());
        // The enrichment thread owns the only output sender: when it ends, consumers see the
        // channel close.
        let enrichment = {
            let drops = self.drops.clone();
            let enricher = enrich::Enricher::with_roots(
                self.config.enrichment_cache_size,
                "/proc".into(),
                self.cgroup_root.clone(),
            );
            tokio::task::spawn_blocking(move || enrich_loop(raw_rx, out_tx, drops, enricher))
        };
        // The deprecated constructor is the safe one: AsyncFd owns the RingBuf, which owns the
        // fd, so the fd stays open for as long as it is registered (the I/O-safety concern
        // behind the deprecation does not arise).
        #[allow(deprecated)]
        let fd = AsyncFd::new(ring);
        let mut fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                let e = ProbeError::Poll(e);
                tracing::error!(error = %e, "eBPF probe cannot read its ring buffer");
                self.status.update(|s| {
                    s.probe.state = ProbeState::Degraded;
                    s.probe.reason = Some(e.to_string());
                });
                return;
            }
        };
        let mut published = Published::default();
        self.publish(&mut published);
        let mut last_publish = tokio::time::Instant::now();
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut tracker = tracker::Tracker::new(
            self.config.max_connections as usize,
            nanos(self.config.open_delay),
            nanos(self.config.update_interval),
        );
        let existing = std::mem::take(&mut self.existing);
        for l in existing.listeners {
            tracker.seed_listener(l.netns, l.port, l.owner);
        }
        if !self.netns_known {
            tracker.want_owners_always();
        }
        // Everything written since the programs were attached first: connections that closed
        // or started since the scan are then known, and not adopted. Those that started have
        // no addresses yet when they are active opens: their reports give them, to tell them
        // from the connections found without a socket address.
        self.drain(fd.get_mut(), &mut raw_tx, &mut tracker);
        if existing.connections.iter().any(|c| c.sk.is_none()) {
            self.report_on(tracker.without_addresses());
            self.drain(fd.get_mut(), &mut raw_tx, &mut tracker);
        }
        let adopted = tracker.adopt(&existing.connections, self.found_ns, &mut |record| {
            raw_tx.push(record)
        });
        raw_tx.flush();
        tracing::info!(
            by_socket = adopted.by_socket,
            by_endpoints = adopted.by_endpoints,
            skipped = adopted.skipped,
            "connections open before the probe adopted"
        );
        let sweep_every = self.config.sweep_period();
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            // Woken by the kernel (enough records waiting), or drain on the period.
            let woken = tokio::select! {
                _ = shutdown.cancelled() => break,
                ready = tokio::time::timeout(READ_PERIOD, fd.readable_mut()) => match ready {
                    Ok(Ok(mut guard)) => {
                        self.drain(guard.get_inner_mut(), &mut raw_tx, &mut tracker);
                        guard.clear_ready();
                        true
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "eBPF ring buffer poll failed");
                        break;
                    }
                    Err(_elapsed) => false,
                },
            };
            if !woken {
                self.drain(fd.get_mut(), &mut raw_tx, &mut tracker);
            }
            if let Some(every) = sweep_every
                && last_sweep.elapsed() >= every
            {
                last_sweep = tokio::time::Instant::now();
                self.sweep(&mut tracker, &mut raw_tx);
                // The reports just written are in the ring by now.
                self.drain(fd.get_mut(), &mut raw_tx, &mut tracker);
            }
            self.want_owners(tracker.owners_wanted(decode::monotonic_ns()));
            if last_publish.elapsed() >= Duration::from_secs(1) {
                last_publish = tokio::time::Instant::now();
                self.publish(&mut published);
            }
        }
        self.drain(fd.get_mut(), &mut raw_tx, &mut tracker);
        drop(raw_tx);
        let _ = enrichment.await;
        self.publish(&mut published);
        tracing::info!("eBPF probe detached");
    }

    /// Reads every record waiting in the ring buffer and joins them into connection events;
    /// never blocks.
    fn drain(
        &self,
        ring: &mut RingBuf<MapData>,
        raw_tx: &mut BatchSender,
        tracker: &mut tracker::Tracker,
    ) {
        let mut read = 0u64;
        while let Some(item) = ring.next() {
            read += 1;
            match decode::read_raw(&item) {
                Ok(raw) => tracker.on_record(raw, &mut |record| raw_tx.push(record)),
                Err(e) => {
                    self.drops.undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "undecodable probe record");
                }
            }
        }
        raw_tx.flush();
        self.drops.read.fetch_add(read, Ordering::Relaxed);
        self.drops
            .untracked
            .store(tracker.untracked, Ordering::Relaxed);
    }

    /// One sweep of the tracker's table: announces long-lived connections, and has the
    /// kernel report on those it must say more about and on those due an update.
    fn sweep(&mut self, tracker: &mut tracker::Tracker, raw_tx: &mut BatchSender) {
        let ask = tracker.sweep(decode::monotonic_ns(), &mut |record| raw_tx.push(record));
        raw_tx.flush();
        self.report_on(ask);
    }

    /// Has the kernel write a report record on each socket in `sockets` (when it can).
    fn report_on(&mut self, sockets: Vec<u64>) {
        let program = self
            .ebpf
            .program(REPORT_PROGRAM)
            .and_then(|p| <&RawTracePoint>::try_from(p).ok())
            .filter(|_| self.reports);
        let Some(program) = program else {
            return;
        };
        for sk in sockets {
            if let Err(e) = run_report(program, sk)
                && !self.warned_report
            {
                self.warned_report = true;
                tracing::warn!(error = %error_chain(&e), "the kernel did not write a connection report; opens or updates may be late");
            }
        }
    }

    /// Switches the kernel's owner records on or off.
    fn want_owners(&mut self, on: bool) {
        if on == self.owners_wanted {
            return;
        }
        if let Some(w) = self.wanted.as_mut() {
            match w.set(wanted::OWNERS, u32::from(on), 0) {
                Ok(()) => self.owners_wanted = on,
                Err(e) => tracing::debug!(error = %e, "switching owner records failed"),
            }
        }
    }

    fn publish(&mut self, last: &mut Published) {
        let k = self.kernel_counters();
        let read = self.drops.read.load(Ordering::Relaxed);
        let nested = match self.nested_runs_skipped() {
            Ok(n) => n,
            Err(e) => {
                if !self.warned_nested {
                    self.warned_nested = true;
                    tracing::warn!(error = %e, "cannot read the kernel's count of skipped probe runs; nested_run_skipped stays at its last value");
                }
                last.nested_run_skipped
            }
        };
        let now = Published {
            state_changes: k.state_changes,
            events: read,
            ring_buffer_full: k.ring_buffer_full,
            nested_run_skipped: nested,
            untracked: self.drops.untracked.load(Ordering::Relaxed),
            reader_full: self.drops.reader_full.load(Ordering::Relaxed),
            output_full: self.drops.output_full.load(Ordering::Relaxed),
            undecodable: self.drops.undecodable.load(Ordering::Relaxed),
        };
        if let Some(m) = &self.metrics {
            m.state_changes
                .inc_by(now.state_changes.saturating_sub(last.state_changes));
            m.events.inc_by(now.events.saturating_sub(last.events));
            for (reason, new, old) in now.drop_pairs(last) {
                m.drops
                    .get_or_create(&DropLabels { reason })
                    .inc_by(new.saturating_sub(old));
            }
        }
        let reasons = now.drop_pairs(last);
        self.status.update(|s| {
            s.probe.events = now.events;
            s.probe.drops = reasons.iter().map(|r| r.1).sum();
            s.probe.drop_reasons = reasons
                .iter()
                .map(|&(reason, n, _)| (reason.to_owned(), n))
                .collect();
        });
        *last = now;
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Published {
    state_changes: u64,
    events: u64,
    ring_buffer_full: u64,
    nested_run_skipped: u64,
    untracked: u64,
    reader_full: u64,
    output_full: u64,
    undecodable: u64,
}

impl Published {
    fn drop_pairs(&self, old: &Published) -> [(&'static str, u64, u64); 6] {
        [
            (
                drop_reason::RING_BUFFER_FULL,
                self.ring_buffer_full,
                old.ring_buffer_full,
            ),
            (drop_reason::UNTRACKED, self.untracked, old.untracked),
            (
                drop_reason::READER_CHANNEL_FULL,
                self.reader_full,
                old.reader_full,
            ),
            (
                drop_reason::OUTPUT_CHANNEL_FULL,
                self.output_full,
                old.output_full,
            ),
            (drop_reason::UNDECODABLE, self.undecodable, old.undecodable),
            (
                drop_reason::NESTED_RUN_SKIPPED,
                self.nested_run_skipped,
                old.nested_run_skipped,
            ),
        ]
    }
}

/// Records a batch holds at most: one drain of the ring buffer is handed over in batches of
/// this size, so the reader and the enrichment thread meet once per batch rather than once
/// per record (each meeting is a channel operation and, often, a wakeup).
const BATCH: usize = 1024;

/// The reader's end of the channel to the enrichment thread: records collect into a batch,
/// which goes over whole. The channel is bounded in records: a batch that does not fit is
/// dropped and counted, so the reader never waits.
struct BatchSender {
    tx: BatchTx<tracker::Record>,
    batch: Vec<tracker::Record>,
    drops: Arc<UserDrops>,
    warned_full: bool,
}

impl BatchSender {
    fn new(tx: BatchTx<tracker::Record>, drops: Arc<UserDrops>) -> Self {
        Self {
            tx,
            batch: Vec::new(),
            drops,
            warned_full: false,
        }
    }

    /// Adds a record to the batch; sends the batch when it is full (at most [`BATCH`]
    /// records, and never more than the channel holds).
    fn push(&mut self, record: tracker::Record) {
        self.batch.push(record);
        if self.batch.len() >= BATCH.min(self.tx.max_items()) {
            self.flush();
        }
    }

    /// Sends the batch, or drops and counts it when the channel has no room for it.
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, self.tx.buffer());
        send_or_drop(
            &self.tx,
            batch,
            &self.drops.reader_full,
            &mut self.warned_full,
            "probe enrichment channel full; dropping events (counted)",
        );
    }
}

/// Sends a batch without waiting. A full channel drops it, counted in `dropped` and said once
/// in the log (`warned`); a closed one (the receiver is gone: shutting down) drops it without
/// counting losses that nobody would have seen, so the sender keeps draining and never blocks.
fn send_or_drop<T>(
    tx: &BatchTx<T>,
    batch: Vec<T>,
    dropped: &AtomicU64,
    warned: &mut bool,
    warning: &'static str,
) {
    let n = batch.len() as u64;
    match tx.try_send(batch) {
        Ok(()) | Err(SendError::Closed(_)) => {}
        Err(SendError::Full(_)) => {
            dropped.fetch_add(n, Ordering::Relaxed);
            if !*warned {
                *warned = true;
                tracing::warn!("{warning}");
            }
        }
    }
}

/// Decodes and enriches records on a blocking thread (it reads /proc and cgroupfs), and hands
/// each batch on whole.
fn enrich_loop(
    mut raw_rx: BatchRx<tracker::Record>,
    out_tx: BatchTx<ConnectionEvent>,
    drops: Arc<UserDrops>,
    enricher: enrich::Enricher,
) {
    let mut enrichment = Enrichment {
        clock: decode::Clock::now(),
        enricher,
        out_tx,
        drops,
        warned_full: false,
    };
    while let Some(batch) = raw_rx.blocking_recv() {
        enrichment.batch(&batch);
        raw_rx.recycle(batch);
    }
}

/// What the enrichment thread keeps between records.
struct Enrichment {
    clock: decode::Clock,
    enricher: enrich::Enricher,
    out_tx: BatchTx<ConnectionEvent>,
    drops: Arc<UserDrops>,
    warned_full: bool,
}

impl Enrichment {
    /// Decodes and enriches a batch of records and hands the events on as one batch, with
    /// the opens the agent reports for the kernel before their closes.
    fn batch(&mut self, records: &[tracker::Record]) {
        let mut events = self.out_tx.buffer();
        events.reserve(records.len() * 2);
        for record in records {
            let mut event = match decode::decode(&record.raw, self.clock) {
                Ok(e) => e,
                Err(e) => {
                    self.drops.undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "undecodable probe record");
                    continue;
                }
            };
            self.enricher.enrich(&mut event);
            if record.open_first {
                events.push(tracker::open_from_close(&event));
            }
            events.push(event);
        }
        // Never more than the channel holds at once (a batch larger than that would never
        // fit): rarely more than one piece.
        let most = self.out_tx.max_items();
        while events.len() > most {
            let rest = events.split_off(most);
            self.send(events);
            events = rest;
        }
        self.send(events);
    }

    fn send(&mut self, events: Vec<ConnectionEvent>) {
        send_or_drop(
            &self.out_tx,
            events,
            &self.drops.output_full,
            &mut self.warned_full,
            "probe output channel full; dropping events (counted)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tests_run_in_the_initial_pid_namespace() {
        // As CI and the development machine do; in a container of its own this would fail,
        // and the agent would read /proc instead of running the iterator.
        let link = std::fs::read_link("/proc/self/ns/pid").unwrap();
        assert_eq!(
            in_initial_pid_namespace(),
            link.to_str() == Some("pid:[4026531836]"),
            "{link:?}"
        );
    }

    #[test]
    fn held_socket_records_are_read_whole_and_a_torn_one_dropped() {
        let mut bytes = Vec::new();
        for (sk, inode, tgid, netns, cgroup_id) in [
            (
                0xffff_8880_0000_1000u64,
                77u64,
                42u32,
                4_026_531_840u32,
                9u64,
            ),
            (1, 2, 3, 4, 5),
        ] {
            bytes.extend_from_slice(&sk.to_ne_bytes());
            bytes.extend_from_slice(&inode.to_ne_bytes());
            bytes.extend_from_slice(&tgid.to_ne_bytes());
            bytes.extend_from_slice(&netns.to_ne_bytes());
            bytes.extend_from_slice(&cgroup_id.to_ne_bytes());
        }
        bytes.extend_from_slice(&[9; 10]);
        let held = held_records(&bytes);
        assert_eq!(held.len(), 2);
        assert_eq!(
            held[0],
            HeldSocket {
                sk: 0xffff_8880_0000_1000,
                inode: 77,
                tgid: 42,
                netns: 4_026_531_840,
                cgroup_id: 9,
            }
        );
        assert_eq!((held[1].netns, held[1].cgroup_id), (4, 5));
    }

    fn record(sk: u64) -> tracker::Record {
        tracker::Record {
            raw: decode::RawEvent {
                sk,
                ..Default::default()
            },
            open_first: false,
        }
    }

    #[test]
    fn a_load_error_says_when_the_verifier_never_ran() {
        let load_error = |log: &str| ProbeError::Program {
            program: "conn_accept",
            attach_point: "fexit inet_csk_accept".to_owned(),
            source: ProgramError::LoadError {
                io_error: std::io::Error::from_raw_os_error(1),
                verifier_log: aya_obj::VerifierLog::new(log.to_owned()),
            },
        };
        let refused = error_chain(&load_error(""));
        assert!(
            refused.ends_with(
                "Verifier output: (empty: the kernel refused the program before the verifier ran)"
            ),
            "{refused}"
        );
        assert!(refused.contains("Operation not permitted"), "{refused}");
        let rejected = error_chain(&load_error("R1 invalid mem access 'scalar'\n"));
        assert!(rejected.contains("R1 invalid mem access"), "{rejected}");
        assert!(!rejected.contains("(empty"), "{rejected}");
    }

    #[test]
    fn the_sweep_runs_at_the_pace_of_the_shorter_need() {
        let period = |open_delay: u64, update_ms: u64| {
            ProbeConfig {
                open_delay: Duration::from_millis(open_delay),
                update_interval: Duration::from_millis(update_ms),
                ..ProbeConfig::default()
            }
            .sweep_period()
        };
        let secs = Duration::from_secs;
        assert_eq!(ProbeConfig::default().sweep_period(), Some(secs(1)));
        assert_eq!(period(5_000, 30_000), Some(secs(5)));
        assert_eq!(
            period(10, 30_000),
            Some(secs(1)),
            "opens: at most once a second"
        );
        assert_eq!(period(0, 200), Some(Duration::from_millis(200)));
        assert_eq!(period(1_000, 0), Some(secs(1)));
        assert_eq!(period(0, 0), None);
    }

    #[test]
    fn the_retransmit_tracepoint_is_attached_only_without_btf_counters() {
        let names = |offsets: &Offsets| hooks(offsets).map(|h| h.name).collect::<Vec<_>>();
        assert_eq!(
            names(&Offsets::UNKNOWN),
            ["inet_sock_set_state", "tcp_retransmit_skb"]
        );
        let with_counters = Offsets {
            total_retrans: 1_234,
            ..Offsets::UNKNOWN
        };
        assert_eq!(names(&with_counters), ["inet_sock_set_state"]);
    }

    #[test]
    fn a_batch_the_enrichment_channel_cannot_take_is_dropped_and_counted() {
        let drops = Arc::new(UserDrops::default());
        let (tx, mut rx) = channel::bounded(3);
        let mut sender = BatchSender::new(tx, drops.clone());
        sender.push(record(1));
        sender.push(record(2));
        sender.flush();
        // Two more do not fit beside the two waiting: the whole batch is dropped, counted.
        sender.push(record(3));
        sender.push(record(4));
        sender.flush();
        assert_eq!(drops.reader_full.load(Ordering::Relaxed), 2);
        let got = rx.try_recv().unwrap();
        assert_eq!(got.iter().map(|r| r.raw.sk).collect::<Vec<_>>(), [1, 2]);
        assert!(rx.try_recv().is_none(), "the dropped batch never arrives");
        // With room again, a batch goes through.
        sender.push(record(5));
        sender.flush();
        assert_eq!(rx.try_recv().unwrap().len(), 1);
        // A full batch (the channel's capacity, here 3) goes out without an explicit flush.
        for sk in 6..9 {
            sender.push(record(sk));
        }
        assert_eq!(rx.try_recv().unwrap().len(), 3);
        assert_eq!(drops.reader_full.load(Ordering::Relaxed), 2);
    }
}
