//! Per-plugin metrics in the agent's prometheus registry.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    plugin: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    plugin: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CustomLabels {
    plugin: String,
    counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CompileLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwapLabels {
    outcome: &'static str,
}

/// The errors a running plugin can have (see `PluginError::kind`).
const RUN_ERROR_KINDS: [&str; 5] = [
    "timeout",
    "memory_limit",
    "stack_overflow",
    "trap",
    "bad_verdicts",
];

type HistogramFamily = Family<PluginLabel, Histogram, fn() -> Histogram>;

fn batch_histogram() -> Histogram {
    // 1 µs .. ~0.26 s
    Histogram::new(exponential_buckets(1e-6, 4.0, 10))
}

/// The plugin host's metrics.
#[derive(Debug)]
pub struct PluginMetrics {
    calls: Family<PluginLabel, Counter>,
    events: Family<PluginLabel, Counter>,
    verdicts: Family<VerdictLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    batch_seconds: HistogramFamily,
    custom: Family<CustomLabels, Counter>,
    compiles: Family<CompileLabels, Counter>,
    swaps: Family<SwapLabels, Counter>,
    log_suppressed: Family<PluginLabel, Counter>,
    /// Every plugin error, all plugins and kinds together (exported over OTLP as
    /// `edgeward.plugin.errors`; `/metrics` has the per-plugin family).
    errors_total: Counter,
}

impl PluginMetrics {
    /// Metrics not registered anywhere (the CLI, tests).
    pub fn unregistered() -> Arc<Self> {
        Arc::new(Self {
            calls: Family::default(),
            events: Family::default(),
            verdicts: Family::default(),
            errors: Family::default(),
            batch_seconds: Family::new_with_constructor(batch_histogram),
            custom: Family::default(),
            compiles: Family::default(),
            swaps: Family::default(),
            log_suppressed: Family::default(),
            errors_total: Counter::default(),
        })
    }

    /// The counter of all plugin errors together.
    pub fn errors_total(&self) -> Counter {
        self.errors_total.clone()
    }

    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self::unregistered();
        let r = registry;
        r.register(
            "edgeward_plugin_calls",
            "Batch calls into each plugin",
            m.calls.clone(),
        );
        r.register(
            "edgeward_plugin_events",
            "Events handed to each plugin",
            m.events.clone(),
        );
        r.register(
            "edgeward_plugin_verdicts",
            "Verdicts of each plugin by kind (keep, drop, edit = attribute edits applied)",
            m.verdicts.clone(),
        );
        r.register(
            "edgeward_plugin_errors",
            "Plugin errors by kind (timeout, trap, memory_limit, bad_verdicts, ...)",
            m.errors.clone(),
        );
        r.register(
            "edgeward_plugin_batch_seconds",
            "Time of one batch call, host side included",
            m.batch_seconds.clone(),
        );
        r.register(
            "edgeward_plugin_custom",
            "Counters plugins add to through the host's counter-add",
            m.custom.clone(),
        );
        r.register(
            "edgeward_plugin_module_loads",
            "Modules made ready by source: compiled, or loaded from the compile cache",
            m.compiles.clone(),
        );
        r.register(
            "edgeward_plugin_swaps",
            "Desired-state changes applied to the chain (applied) or refused (rejected)",
            m.swaps.clone(),
        );
        r.register(
            "edgeward_plugin_log_suppressed",
            "Plugin log lines dropped by the host's rate limit",
            m.log_suppressed.clone(),
        );
        m
    }

    /// Counts a module made ready: `compiled` or `cache`.
    pub fn module_loaded(&self, source: &'static str) {
        self.compiles.get_or_create(&CompileLabels { source }).inc();
    }

    /// How many modules were made ready from `source` (`compiled` or `cache`).
    pub fn modules_loaded(&self, source: &'static str) -> u64 {
        self.compiles.get_or_create(&CompileLabels { source }).get()
    }

    /// Counts a swap: `applied` or `rejected`.
    pub fn swap(&self, outcome: &'static str) {
        self.swaps.get_or_create(&SwapLabels { outcome }).inc();
    }

    /// Counts an error of `plugin`.
    pub fn error(&self, plugin: &str, kind: &'static str) {
        self.errors_total.inc();
        self.errors
            .get_or_create(&ErrorLabels {
                plugin: plugin.to_owned(),
                kind,
            })
            .inc();
    }

    /// Errors of `plugin` of `kind` so far.
    pub fn errors(&self, plugin: &str, kind: &'static str) -> u64 {
        self.errors
            .get_or_create(&ErrorLabels {
                plugin: plugin.to_owned(),
                kind,
            })
            .get()
    }

    /// Adds to a plugin's own counter.
    pub fn custom(&self, plugin: &str, counter: &str, delta: u64) {
        self.custom
            .get_or_create(&CustomLabels {
                plugin: plugin.to_owned(),
                counter: counter.to_owned(),
            })
            .inc_by(delta);
    }

    /// A log line of `plugin` was suppressed.
    pub fn log_suppressed(&self, plugin: &str) {
        self.log_suppressed
            .get_or_create(&PluginLabel {
                plugin: plugin.to_owned(),
            })
            .inc();
    }

    /// Handles on one plugin's series, resolved once so the data path does no lookups.
    pub(crate) fn handles(self: &Arc<Self>, plugin: &str) -> PluginHandles {
        let p = || PluginLabel {
            plugin: plugin.to_owned(),
        };
        let v = |verdict| VerdictLabels {
            plugin: plugin.to_owned(),
            verdict,
        };
        // One statement per series: a `get_or_create` guard held across a second call on
        // the same family (a new label set takes its write lock) would deadlock.
        let calls = self.calls.get_or_create(&p()).clone();
        let events = self.events.get_or_create(&p()).clone();
        let keep = self.verdicts.get_or_create(&v("keep")).clone();
        let drop = self.verdicts.get_or_create(&v("drop")).clone();
        let edit = self.verdicts.get_or_create(&v("edit")).clone();
        let batch_seconds = self.batch_seconds.get_or_create(&p()).clone();
        // Errors at zero from the start, so rate() and alerts work before the first one.
        for kind in RUN_ERROR_KINDS {
            std::mem::drop(self.errors.get_or_create(&ErrorLabels {
                plugin: plugin.to_owned(),
                kind,
            }));
        }
        PluginHandles {
            calls,
            events,
            keep,
            drop,
            edit,
            batch_seconds,
        }
    }
}

/// One plugin's series.
#[derive(Debug, Clone)]
pub(crate) struct PluginHandles {
    pub calls: Counter,
    pub events: Counter,
    pub keep: Counter,
    pub drop: Counter,
    pub edit: Counter,
    pub batch_seconds: Histogram,
}
