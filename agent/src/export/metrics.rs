//! Connection metrics beside the spans: counters and histograms over the connection events,
//! keyed by a configurable set of attribute keys, with a cap on series per metric.
//!
//! Values are cumulative since the agent started. When a metric already has `max_series`
//! series, an event with a new attribute set is counted in one overflow series whose only
//! attribute is `otel.metric.overflow = true` (the OpenTelemetry SDK's convention), and the
//! fold is counted in `edgeward.export.metric_overflow`.

use std::collections::{HashMap, hash_map::Entry};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
    resource::v1::Resource,
};

use super::spans;
use crate::probe::event::{ConnectionEvent, EventKind};

/// Bucket bounds of the RTT histogram, seconds (50 µs … 2 s).
pub const RTT_BOUNDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.0,
];
/// Bucket bounds of the duration histogram, seconds (1 ms … 1 h).
pub const DURATION_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The metrics, in export order: (name, unit, description).
const COUNTERS: [(&str, &str, &str); 5] = [
    (
        "edgeward.tcp.connections.opened",
        "{connection}",
        "TCP connections opened",
    ),
    (
        "edgeward.tcp.connections.closed",
        "{connection}",
        "TCP connections closed",
    ),
    (
        "edgeward.tcp.bytes_sent",
        "By",
        "Bytes sent (acknowledged by the peer), counted at each update of an open connection and at its close",
    ),
    (
        "edgeward.tcp.bytes_received",
        "By",
        "Bytes received, counted at each update of an open connection and at its close",
    ),
    (
        "edgeward.tcp.retransmits",
        "{segment}",
        "Segments retransmitted, counted at each update of an open connection and at its close",
    ),
];

/// Open connections whose updates the byte and retransmit counters follow, at most. One that
/// finds the table full is counted at its close alone.
const MAX_FOLLOWED: usize = 1 << 16;

/// What the counters have taken of an open connection's totals so far.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    bytes_sent: u64,
    bytes_received: u64,
    retransmits: u32,
}
const OPENED: usize = 0;
const CLOSED: usize = 1;
const BYTES_SENT: usize = 2;
const BYTES_RECEIVED: usize = 3;
const RETRANSMITS: usize = 4;

/// An attribute value usable as part of a series key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyPart {
    Str(String),
    Int(i64),
    Bool(bool),
    Float(u64),
    Other,
}

type SeriesKey = Vec<(String, KeyPart)>;

fn key_part(v: &Option<AnyValue>) -> KeyPart {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => KeyPart::Str(s.clone()),
        Some(any_value::Value::IntValue(i)) => KeyPart::Int(*i),
        Some(any_value::Value::BoolValue(b)) => KeyPart::Bool(*b),
        Some(any_value::Value::DoubleValue(f)) => KeyPart::Float(f.to_bits()),
        _ => KeyPart::Other,
    }
}

fn part_value(p: &KeyPart) -> AnyValue {
    AnyValue {
        value: Some(match p {
            KeyPart::Str(s) => any_value::Value::StringValue(s.clone()),
            KeyPart::Int(i) => any_value::Value::IntValue(*i),
            KeyPart::Bool(b) => any_value::Value::BoolValue(*b),
            KeyPart::Float(f) => any_value::Value::DoubleValue(f64::from_bits(*f)),
            KeyPart::Other => any_value::Value::StringValue(String::new()),
        }),
    }
}

#[derive(Debug, Clone, Default)]
struct Hist {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    buckets: Vec<u64>,
}

impl Hist {
    fn record(&mut self, bounds: &[f64], v: f64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; bounds.len() + 1];
            self.min = v;
            self.max = v;
        }
        let i = bounds.partition_point(|b| *b < v);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }
}

/// One metric's series, capped.
#[derive(Debug, Default)]
struct Series<T> {
    /// FxHash: a series key is hashed for each of seven metrics on every close, and SipHash
    /// (the std default, resistant to flooding that these keys cannot mount) showed in
    /// profiles of the agent under churn.
    by_key: HashMap<SeriesKey, T, rustc_hash::FxBuildHasher>,
    overflow: Option<T>,
}

impl<T: Default> Series<T> {
    /// The slot for `key`; the overflow slot when the cap is reached. Returns whether it
    /// folded.
    fn slot(&mut self, key: &SeriesKey, cap: usize) -> (&mut T, bool) {
        if self.by_key.contains_key(key) {
            return (self.by_key.get_mut(key).expect("checked above"), false);
        }
        if self.by_key.len() < cap {
            return (self.by_key.entry(key.clone()).or_default(), false);
        }
        (self.overflow.get_or_insert_with(T::default), true)
    }
}

/// Cumulative connection metrics.
#[derive(Debug)]
pub struct ConnectionMetrics {
    keys: Vec<String>,
    max_series: usize,
    start_unix_nanos: u64,
    counters: [Series<u64>; 5],
    rtt: Series<Hist>,
    duration: Series<Hist>,
    /// By connection id, what its updates added to the counters: its close adds the rest.
    /// A close a plugin drops ends the following too ([`Self::forget`]); one lost before the
    /// pipeline (counted as a probe loss) leaves its connection here. When the table is full,
    /// new connections count at their close only.
    followed: HashMap<u64, Counted, rustc_hash::FxBuildHasher>,
}

impl ConnectionMetrics {
    /// Empty metrics keyed by `keys`, at most `max_series` series per metric.
    pub fn new(keys: Vec<String>, max_series: usize) -> Self {
        ConnectionMetrics {
            keys,
            max_series: max_series.max(1),
            start_unix_nanos: now_unix_nanos(),
            counters: Default::default(),
            rtt: Series::default(),
            duration: Series::default(),
            followed: HashMap::default(),
        }
    }

    /// Changes the attribute keys and the cap. Changing the keys starts the series afresh
    /// (the old ones cannot be mapped onto new keys); what open connections had counted stays
    /// counted, so the new series start from now.
    pub fn reconfigure(&mut self, keys: &[String], max_series: usize) {
        if keys != self.keys.as_slice() {
            let followed = std::mem::take(&mut self.followed);
            *self = ConnectionMetrics::new(keys.to_vec(), max_series);
            self.followed = followed;
        } else {
            self.max_series = max_series.max(1);
        }
    }

    /// Stops following connection `conn_id`, whose close will not be recorded: what its
    /// updates added stays counted.
    pub fn forget(&mut self, conn_id: u64) {
        self.followed.remove(&conn_id);
    }

    /// How many connections are followed.
    #[cfg(test)]
    pub(crate) fn followed(&self) -> usize {
        self.followed.len()
    }

    /// Records one event whose final attributes are `attrs`. Returns how many updates folded
    /// into an overflow series.
    pub fn record(&mut self, ev: &ConnectionEvent, attrs: &[KeyValue]) -> u64 {
        let key = self.series_key(|k| {
            attrs
                .iter()
                .find(|a| a.key == k)
                .map(|a| key_part(&a.value))
        });
        self.record_keyed(ev, key)
    }

    /// Records one event for which no span (and so no attribute list) is built: only the
    /// attributes the series key needs are computed. Same result as [`Self::record`] with
    /// the event's full attributes.
    pub fn record_event(&mut self, ev: &ConnectionEvent) -> u64 {
        let key = self.series_key(|k| spans::attribute(ev, k).map(|v| key_part(&Some(v))));
        self.record_keyed(ev, key)
    }

    /// The series key: the configured attribute keys that `value_of` knows, in order.
    fn series_key(&self, value_of: impl Fn(&str) -> Option<KeyPart>) -> SeriesKey {
        self.keys
            .iter()
            .filter_map(|k| value_of(k).map(|v| (k.clone(), v)))
            .collect()
    }

    /// What `ev` adds to the byte and retransmit counters: its totals less what the
    /// connection's earlier updates added. An update is counted only while the connection can
    /// be followed (the table has room); a close ends the following.
    fn not_yet_counted(&mut self, ev: &ConnectionEvent) -> Counted {
        let now = Counted {
            bytes_sent: ev.bytes_sent,
            bytes_received: ev.bytes_received,
            retransmits: ev.retransmits,
        };
        let full = self.followed.len() >= MAX_FOLLOWED;
        let before = match ev.kind {
            EventKind::Close => self.followed.remove(&ev.conn_id),
            _ => match self.followed.entry(ev.conn_id) {
                Entry::Occupied(mut counted) => Some(counted.insert(now)),
                Entry::Vacant(slot) if !full => {
                    slot.insert(now);
                    None
                }
                // Not followed: its close counts it all.
                Entry::Vacant(_) => return Counted::default(),
            },
        }
        .unwrap_or_default();
        // The kernel's counters only grow; saturating all the same.
        Counted {
            bytes_sent: now.bytes_sent.saturating_sub(before.bytes_sent),
            bytes_received: now.bytes_received.saturating_sub(before.bytes_received),
            retransmits: now.retransmits.saturating_sub(before.retransmits),
        }
    }

    fn record_keyed(&mut self, ev: &ConnectionEvent, key: SeriesKey) -> u64 {
        let new = match ev.kind {
            EventKind::Open => Counted::default(),
            EventKind::Update | EventKind::Close => self.not_yet_counted(ev),
        };
        let cap = self.max_series;
        let mut folded = 0;
        let mut add = |series: &mut Series<u64>, v: u64| {
            let (slot, f) = series.slot(&key, cap);
            *slot += v;
            folded += u64::from(f);
        };
        match ev.kind {
            EventKind::Open => add(&mut self.counters[OPENED], 1),
            EventKind::Update => {
                add(&mut self.counters[BYTES_SENT], new.bytes_sent);
                add(&mut self.counters[BYTES_RECEIVED], new.bytes_received);
                add(&mut self.counters[RETRANSMITS], new.retransmits.into());
            }
            EventKind::Close => {
                add(&mut self.counters[CLOSED], 1);
                add(&mut self.counters[BYTES_SENT], new.bytes_sent);
                add(&mut self.counters[BYTES_RECEIVED], new.bytes_received);
                add(&mut self.counters[RETRANSMITS], new.retransmits.into());
                let (h, f) = self.rtt.slot(&key, cap);
                h.record(RTT_BOUNDS, f64::from(ev.srtt_us) / 1e6);
                folded += u64::from(f);
                // The duration of a connection open before the probe is not known.
                if !ev.started_before_probe {
                    let (h, f) = self.duration.slot(&key, cap);
                    h.record(DURATION_BOUNDS, ev.duration_nanos() as f64 / 1e9);
                    folded += u64::from(f);
                }
            }
        }
        folded
    }

    /// The metrics as OTLP, cumulative since start.
    pub fn to_metrics(&self) -> Vec<Metric> {
        let now = now_unix_nanos();
        let start = self.start_unix_nanos;
        let attrs = |key: &SeriesKey| -> Vec<KeyValue> {
            key.iter()
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: Some(part_value(v)),
                })
                .collect()
        };
        let overflow_attrs = || {
            vec![KeyValue {
                key: "otel.metric.overflow".to_owned(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::BoolValue(true)),
                }),
            }]
        };
        let mut out = Vec::new();
        for (i, (name, unit, description)) in COUNTERS.iter().enumerate() {
            let series = &self.counters[i];
            let mut points: Vec<NumberDataPoint> = series
                .by_key
                .iter()
                .map(|(k, v)| number_point(attrs(k), *v, start, now))
                .collect();
            if let Some(v) = series.overflow {
                points.push(number_point(overflow_attrs(), v, start, now));
            }
            out.push(Metric {
                name: (*name).to_owned(),
                description: (*description).to_owned(),
                unit: (*unit).to_owned(),
                metadata: Vec::new(),
                data: Some(metric::Data::Sum(Sum {
                    data_points: points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                })),
            });
        }
        for (name, description, series, bounds) in [
            (
                "edgeward.tcp.rtt",
                "Smoothed round-trip time of closed connections",
                &self.rtt,
                RTT_BOUNDS,
            ),
            (
                "edgeward.tcp.connection.duration",
                "Duration of closed connections, open to close",
                &self.duration,
                DURATION_BOUNDS,
            ),
        ] {
            let mut points: Vec<HistogramDataPoint> = series
                .by_key
                .iter()
                .map(|(k, h)| hist_point(attrs(k), h, bounds, start, now))
                .collect();
            if let Some(h) = &series.overflow {
                points.push(hist_point(overflow_attrs(), h, bounds, start, now));
            }
            out.push(Metric {
                name: name.to_owned(),
                description: description.to_owned(),
                unit: "s".to_owned(),
                metadata: Vec::new(),
                data: Some(metric::Data::Histogram(Histogram {
                    data_points: points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                })),
            });
        }
        out
    }
}

fn number_point(attributes: Vec<KeyValue>, v: u64, start: u64, now: u64) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        exemplars: Vec::new(),
        flags: 0,
        value: Some(number_data_point::Value::AsInt(
            i64::try_from(v).unwrap_or(i64::MAX),
        )),
    }
}

fn hist_point(
    attributes: Vec<KeyValue>,
    h: &Hist,
    bounds: &[f64],
    start: u64,
    now: u64,
) -> HistogramDataPoint {
    let mut buckets = h.buckets.clone();
    buckets.resize(bounds.len() + 1, 0);
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: h.count,
        sum: Some(h.sum),
        bucket_counts: buckets,
        explicit_bounds: bounds.to_vec(),
        exemplars: Vec::new(),
        flags: 0,
        min: (h.count > 0).then_some(h.min),
        max: (h.count > 0).then_some(h.max),
    }
}

/// A metrics export request around `metrics`.
pub fn request(resource: &Resource, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(super::spans::scope()),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::spans::tests_support;
    use crate::{export::spans, probe::event::CloseReason};

    #[test]
    fn series_are_capped_into_an_overflow_series() {
        let mut m = ConnectionMetrics::new(vec!["network.peer.port".into()], 2);
        let mut folded = 0;
        for port in [1u16, 2, 3, 4, 1] {
            let mut ev = spans::tests_support::event();
            ev.peer.set_port(port);
            ev.close_reason = CloseReason::Normal;
            ev.edits.clear();
            folded += m.record(&ev, &spans::attributes(&ev));
        }
        // Ports 3 and 4 arrive after the cap of two series: they fold into the overflow.
        let closed = m.to_metrics().remove(CLOSED);
        let Some(metric::Data::Sum(sum)) = closed.data else {
            panic!("closed is a sum")
        };
        assert_eq!(sum.data_points.len(), 3, "two series and the overflow");
        let total: i64 = sum
            .data_points
            .iter()
            .map(|p| match p.value {
                Some(number_data_point::Value::AsInt(i)) => i,
                _ => 0,
            })
            .sum();
        assert_eq!(total, 5);
        // Two events folded, each touching 4 counters and 2 histograms.
        assert_eq!(folded, 2 * 6);
    }

    /// The totals of counter `i` over its series.
    fn total(m: &ConnectionMetrics, i: usize) -> u64 {
        m.counters[i].by_key.values().sum::<u64>() + m.counters[i].overflow.unwrap_or(0)
    }

    #[test]
    fn updates_count_what_their_counters_grew_by_and_the_close_the_rest() {
        let mut m = ConnectionMetrics::new(vec!["network.peer.port".into()], 10);
        let at = |kind, conn_id, sent: u64, retransmits| {
            let mut ev = spans::tests_support::event();
            (ev.kind, ev.conn_id, ev.bytes_sent, ev.bytes_received) = (kind, conn_id, sent, 0);
            ev.retransmits = retransmits;
            ev
        };
        m.record_event(&at(EventKind::Open, 1, 0, 0));
        m.record_event(&at(EventKind::Update, 1, 100, 1));
        assert_eq!((total(&m, BYTES_SENT), total(&m, RETRANSMITS)), (100, 1));
        m.record_event(&at(EventKind::Update, 1, 250, 1));
        assert_eq!(total(&m, BYTES_SENT), 250);
        // A change of keys starts new series; what was counted stays counted.
        m.reconfigure(&["process.pid".to_owned()], 10);
        let close = at(EventKind::Close, 1, 300, 2);
        m.record(&close, &spans::attributes(&close));
        assert_eq!((total(&m, BYTES_SENT), total(&m, RETRANSMITS)), (50, 1));
        assert!(m.followed.is_empty());
        // A close without updates counts it all.
        let close = at(EventKind::Close, 2, 40, 0);
        m.record(&close, &spans::attributes(&close));
        assert_eq!(total(&m, BYTES_SENT), 90);
        // With the table full an update is not followed, and its close counts it all.
        for id in 0..MAX_FOLLOWED as u64 {
            m.followed.insert(1000 + id, Counted::default());
        }
        m.record_event(&at(EventKind::Update, 3, 500, 0));
        assert_eq!(total(&m, BYTES_SENT), 90);
        let close = at(EventKind::Close, 3, 600, 0);
        m.record(&close, &spans::attributes(&close));
        assert_eq!(total(&m, BYTES_SENT), 690);
    }

    #[test]
    fn a_forgotten_connection_keeps_what_it_counted_and_leaves_the_table() {
        let mut m = ConnectionMetrics::new(Vec::new(), 10);
        let at = |id, sent| ConnectionEvent {
            kind: EventKind::Update,
            conn_id: id,
            bytes_sent: sent,
            ..tests_support::event()
        };
        m.record_event(&at(1, 100));
        m.record_event(&at(2, 30));
        m.forget(1);
        assert_eq!(m.followed(), 1);
        assert_eq!(total(&m, BYTES_SENT), 130);
    }
}
