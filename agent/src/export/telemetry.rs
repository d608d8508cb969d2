//! edgeward's own telemetry about the pipeline and export: counters and gauges registered on
//! the admin server's Prometheus registry (`/metrics`) and exported over OTLP beside the
//! connection metrics, under the same meaning (`edgeward_export_batches_total` on `/metrics`
//! is `edgeward.export.batches` over OTLP).

use opentelemetry_proto::tonic::{
    common::v1::KeyValue,
    metrics::v1::{
        AggregationTemporality, Gauge, Metric, NumberDataPoint, Sum, metric, number_data_point,
    },
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge as PromGauge, histogram::Histogram},
    registry::Registry,
};

use crate::status::StatusHandle;

/// The self-metrics. Clones share the same values.
#[derive(Debug, Clone)]
pub struct ExportTelemetry {
    /// Events taken from the probe channel.
    pub events: Counter,
    /// Events dropped because the probe → pipeline channel was full.
    pub channel_drops: Counter,
    /// Batches formed.
    pub pipeline_batches: Counter,
    /// Calls into the plugin chain (one per batch).
    pub plugin_calls: Counter,
    /// Plugin errors, all plugins together: the plugin host's counter, shared (OTLP only;
    /// `/metrics` has the host's per-plugin family).
    pub plugin_errors: Counter,
    /// Events the plugin chain dropped.
    pub plugin_dropped: Counter,
    /// Time in the plugin chain per batch, seconds.
    pub plugin_latency: Histogram,
    /// Time in the plugin chain in all, nanoseconds (exported over OTLP as
    /// `edgeward.pipeline.chain_time`, seconds).
    pub plugin_nanos: Counter,
    /// Spans queued for export.
    pub spans: Counter,
    /// Trace requests delivered.
    pub trace_batches: Counter,
    /// Metric requests delivered.
    pub metric_batches: Counter,
    /// Failed send attempts (each retry counts).
    pub failures: Counter,
    /// Spans dropped: queue full (oldest first), non-retryable rejection, or shutdown deadline.
    pub dropped_spans: Counter,
    /// Requests waiting in the export queue.
    pub queue_depth: PromGauge,
    /// Bytes waiting in the export queue.
    pub queue_bytes: PromGauge,
    /// Metric updates folded into an overflow series by the cardinality cap.
    pub metric_overflow: Counter,
    /// Synced export settings that were rejected.
    pub config_errors: Counter,
}

impl Default for ExportTelemetry {
    fn default() -> Self {
        ExportTelemetry {
            events: Counter::default(),
            channel_drops: Counter::default(),
            pipeline_batches: Counter::default(),
            plugin_calls: Counter::default(),
            plugin_errors: Counter::default(),
            plugin_dropped: Counter::default(),
            plugin_latency: Histogram::new([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0]),
            plugin_nanos: Counter::default(),
            spans: Counter::default(),
            trace_batches: Counter::default(),
            metric_batches: Counter::default(),
            failures: Counter::default(),
            dropped_spans: Counter::default(),
            queue_depth: PromGauge::default(),
            queue_bytes: PromGauge::default(),
            metric_overflow: Counter::default(),
            config_errors: Counter::default(),
        }
    }
}

impl ExportTelemetry {
    /// Registers every self-metric on `registry` (served on `/metrics`).
    pub fn register(&self, registry: &mut Registry) {
        for (name, help, c) in self.counters() {
            registry.register(name.replace('.', "_"), help, c.clone());
        }
        registry.register(
            "edgeward_pipeline_chain_seconds",
            "Time in the plugin chain per batch",
            self.plugin_latency.clone(),
        );
        registry.register(
            "edgeward_export_queue_depth",
            "Requests waiting in the export queue",
            self.queue_depth.clone(),
        );
        registry.register(
            "edgeward_export_queue_bytes",
            "Bytes waiting in the export queue",
            self.queue_bytes.clone(),
        );
    }

    fn counters(&self) -> [(&'static str, &'static str, &Counter); 12] {
        [
            (
                "edgeward.pipeline.events",
                "Connection events taken into the pipeline",
                &self.events,
            ),
            (
                "edgeward.pipeline.channel_drops",
                "Events dropped: probe to pipeline channel full",
                &self.channel_drops,
            ),
            (
                "edgeward.pipeline.batches",
                "Batches formed by the pipeline",
                &self.pipeline_batches,
            ),
            (
                "edgeward.pipeline.chain_calls",
                "Calls into the plugin chain",
                &self.plugin_calls,
            ),
            (
                "edgeward.pipeline.chain_dropped_events",
                "Events dropped by the plugin chain",
                &self.plugin_dropped,
            ),
            (
                "edgeward.export.spans",
                "Spans queued for export",
                &self.spans,
            ),
            (
                "edgeward.export.trace_batches",
                "Trace requests delivered",
                &self.trace_batches,
            ),
            (
                "edgeward.export.metric_batches",
                "Metric requests delivered",
                &self.metric_batches,
            ),
            (
                "edgeward.export.failures",
                "Failed export attempts",
                &self.failures,
            ),
            (
                "edgeward.export.dropped_spans",
                "Spans dropped (queue full, rejected, shutdown)",
                &self.dropped_spans,
            ),
            (
                "edgeward.export.metric_overflow",
                "Metric updates folded into an overflow series",
                &self.metric_overflow,
            ),
            (
                "edgeward.export.config_errors",
                "Synced export settings rejected",
                &self.config_errors,
            ),
        ]
    }

    /// The self-metrics as OTLP (cumulative sums and gauges); probe counters come from the
    /// status document, which the probe keeps.
    pub fn to_metrics(&self, status: &StatusHandle, start: u64, now: u64) -> Vec<Metric> {
        let point = |v: i64| NumberDataPoint {
            attributes: Vec::<KeyValue>::new(),
            start_time_unix_nano: start,
            time_unix_nano: now,
            exemplars: Vec::new(),
            flags: 0,
            value: Some(number_data_point::Value::AsInt(v)),
        };
        let sum = |name: &str, help: &str, v: u64| Metric {
            name: name.to_owned(),
            description: help.to_owned(),
            unit: "1".to_owned(),
            metadata: Vec::new(),
            data: Some(metric::Data::Sum(Sum {
                data_points: vec![point(i64::try_from(v).unwrap_or(i64::MAX))],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            })),
        };
        let gauge = |name: &str, help: &str, v: i64| Metric {
            name: name.to_owned(),
            description: help.to_owned(),
            unit: "1".to_owned(),
            metadata: Vec::new(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: vec![point(v)],
            })),
        };
        let mut out: Vec<Metric> = self
            .counters()
            .iter()
            .map(|(n, h, c)| sum(n, h, c.get()))
            .collect();
        out.push(Metric {
            name: "edgeward.pipeline.chain_time".to_owned(),
            description: "Time spent in the plugin chain".to_owned(),
            unit: "s".to_owned(),
            metadata: Vec::new(),
            data: Some(metric::Data::Sum(Sum {
                data_points: vec![NumberDataPoint {
                    value: Some(number_data_point::Value::AsDouble(
                        self.plugin_nanos.get() as f64 / 1e9,
                    )),
                    ..point(0)
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            })),
        });
        out.push(sum(
            "edgeward.plugin.errors",
            "Plugin errors (traps, timeouts, limits, bad verdicts, load failures)",
            self.plugin_errors.get(),
        ));
        let (probe_events, probe_drops) = status.read(|s| (s.probe.events, s.probe.drops));
        out.push(sum(
            "edgeward.probe.events",
            "Kernel events seen by the probe",
            probe_events,
        ));
        out.push(sum(
            "edgeward.probe.drops",
            "Kernel events lost by the probe",
            probe_drops,
        ));
        out.push(gauge(
            "edgeward.export.queue_depth",
            "Requests waiting in the export queue",
            self.queue_depth.get(),
        ));
        out.push(gauge(
            "edgeward.export.queue_bytes",
            "Bytes waiting in the export queue",
            self.queue_bytes.get(),
        ));
        out
    }
}
