//! The exporter: turns judged batches into encoded OTLP requests (in the pipeline's task, via
//! [`ExportHandle`]) and ships them from the bounded queue (in its own task, [`Exporter::run`]),
//! retrying with backoff, following setting changes from the synced config.

use std::{
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use super::{
    ExportConfig, ExportError, ExportTelemetry,
    metrics::{self as conn_metrics, ConnectionMetrics},
    queue::{Dropped, Item, Queue, Signal},
    spans::{self, NodeIdentity},
    transport::Transport,
};
use crate::{
    backoff::Backoff,
    probe::event::{ConnectionEvent, EventKind},
    status::StatusHandle,
    sync::DesiredStateRx,
};

/// What the pipeline side needs from the current settings.
#[derive(Debug)]
struct Active {
    config: ExportConfig,
    resource: Resource,
}

struct Shared {
    active: RwLock<Arc<Active>>,
    metrics: Mutex<ConnectionMetrics>,
    queue: Queue,
    telemetry: ExportTelemetry,
    status: StatusHandle,
    node: NodeIdentity,
    salt: u64,
    start_unix_nanos: u64,
}

impl Shared {
    fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The connection metrics, locked (a panic while they were held leaves them usable).
    fn connection_metrics(&self) -> MutexGuard<'_, ConnectionMetrics> {
        self.metrics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_dropped(&self, d: Dropped) {
        if d.items > 0 {
            self.telemetry.dropped_spans.inc_by(d.spans);
            let dropped = self.telemetry.dropped_spans.get();
            self.status.update(|s| s.export.dropped = dropped);
        }
    }

    fn push(&self, item: Item) {
        let d = self.queue.push(item);
        if d.items > 0 && self.queue.overflows() == d.items {
            tracing::warn!(
                dropped_spans = d.spans,
                "export queue full: dropping the oldest requests (counted in edgeward_export_dropped_spans_total)"
            );
        }
        self.count_dropped(d);
        self.update_depth();
    }

    fn update_depth(&self) {
        let (items, bytes) = self.queue.depth();
        self.telemetry.queue_depth.set(items as i64);
        self.telemetry.queue_bytes.set(bytes as i64);
    }
}

/// The pipeline's side of the exporter: cheap to clone.
#[derive(Clone)]
pub struct ExportHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ExportHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportHandle").finish_non_exhaustive()
    }
}

impl ExportHandle {
    /// The current settings (the agent's `[otlp]` with synced overrides applied).
    pub fn config(&self) -> ExportConfig {
        self.shared.active().config.clone()
    }

    /// The self-metrics.
    pub fn telemetry(&self) -> &ExportTelemetry {
        &self.shared.telemetry
    }

    /// Ends what the connection metrics follow of connections whose close will not come
    /// (a plugin dropped it): they are counted no further, and free their place in the
    /// bounded table, which would otherwise fill with them and stop following new ones.
    pub fn forget(&self, closed: &[u64]) {
        if closed.is_empty() {
            return;
        }
        let mut metrics = self.shared.connection_metrics();
        for &id in closed {
            metrics.forget(id);
        }
    }

    /// How many connections the connection metrics follow.
    #[cfg(test)]
    pub(crate) fn followed(&self) -> usize {
        self.shared.connection_metrics().followed()
    }

    /// Turns a judged batch into metric updates (every event) and spans (close events), and
    /// queues the spans as one encoded request. Never waits: a full queue drops its oldest.
    pub fn push_batch(&self, batch: &[ConnectionEvent]) {
        if batch.is_empty() {
            return;
        }
        let active = self.shared.active();
        // Without a collector nothing built here would ever leave the process: no spans, and
        // connection metrics are only exported over OTLP (`/metrics` has the self-metrics).
        if active.config.endpoint.is_none() {
            return;
        }
        let mut spans = Vec::new();
        let mut folded = 0;
        {
            let mut metrics = self.shared.connection_metrics();
            for ev in batch {
                if ev.kind == EventKind::Close {
                    let span = spans::span(ev, self.shared.salt);
                    folded += metrics.record(ev, &span.attributes);
                    spans.push(span);
                } else {
                    // Opens count; updates add what their counters grew by since the last.
                    folded += metrics.record_event(ev);
                }
            }
        }
        if folded > 0 {
            self.shared.telemetry.metric_overflow.inc_by(folded);
        }
        if spans.is_empty() {
            return;
        }
        let n = spans.len() as u64;
        let body = spans::request(&active.resource, spans).encode_to_vec();
        self.shared.telemetry.spans.inc_by(n);
        self.shared.push(Item {
            signal: Signal::Traces,
            body: Bytes::from(body),
            spans: n,
        });
    }

    /// Queues the current connection and self metrics as one request.
    pub fn push_metrics(&self) {
        let active = self.shared.active();
        if active.config.endpoint.is_none() {
            return;
        }
        let mut metrics = self.shared.connection_metrics().to_metrics();
        metrics.extend(self.shared.telemetry.to_metrics(
            &self.shared.status,
            self.shared.start_unix_nanos,
            conn_metrics::now_unix_nanos(),
        ));
        let body = conn_metrics::request(&active.resource, metrics).encode_to_vec();
        self.shared.push(Item {
            signal: Signal::Metrics,
            body: Bytes::from(body),
            spans: 0,
        });
    }
}

/// The sender task, built from the agent's `[otlp]` settings.
pub struct Exporter {
    base: ExportConfig,
    shared: Arc<Shared>,
    transport: Option<Transport>,
    desired: Option<DesiredStateRx>,
    /// The synced `export` section last seen (to skip unrelated changes).
    last_override: serde_json::Value,
}

impl Exporter {
    /// Builds the exporter from the agent config. A transport that cannot be built (bad TLS
    /// file) does not stop the agent: export is `failing` with the reason, and a later
    /// setting change can fix it.
    pub fn build(
        base: &ExportConfig,
        node: NodeIdentity,
        status: StatusHandle,
        telemetry: ExportTelemetry,
        desired: Option<DesiredStateRx>,
    ) -> (Exporter, ExportHandle) {
        let active = Active {
            config: base.clone(),
            resource: spans::resource(&node, &base.resource),
        };
        let shared = Arc::new(Shared {
            metrics: Mutex::new(ConnectionMetrics::new(
                base.metric_attributes.clone(),
                base.max_series,
            )),
            queue: Queue::new(base.queue_max_bytes),
            active: RwLock::new(Arc::new(active)),
            telemetry,
            status,
            node,
            salt: spans::id_salt(),
            start_unix_nanos: conn_metrics::now_unix_nanos(),
        });
        let mut exporter = Exporter {
            base: base.clone(),
            shared: shared.clone(),
            transport: None,
            desired,
            last_override: serde_json::Value::Null,
        };
        // Apply the synced settings present at start, if any.
        let initial = exporter
            .desired
            .as_mut()
            .map(|rx| rx.borrow_and_update().node_config["export"].clone())
            .unwrap_or(serde_json::Value::Null);
        let config = match base.with_overrides(&initial) {
            Ok(c) => c,
            Err(e) => {
                exporter.config_rejected(&e.to_string());
                base.clone()
            }
        };
        exporter.last_override = initial;
        exporter.apply(config);
        (exporter, ExportHandle { shared })
    }

    fn config_rejected(&self, why: &str) {
        tracing::error!(error = %why, "synced export settings rejected; keeping the last good ones");
        self.shared.telemetry.config_errors.inc();
        let why = why.to_owned();
        self.shared.status.update(|s| {
            s.export.config_error = Some(why);
        });
    }

    /// Switches to `config`: new transport, resource, metric keys, queue bound.
    fn apply(&mut self, config: ExportConfig) {
        let d = self.shared.queue.set_max_bytes(config.queue_max_bytes);
        self.shared.count_dropped(d);
        self.shared
            .connection_metrics()
            .reconfigure(&config.metric_attributes, config.max_series);
        let (state, reason) = match &config.endpoint {
            None => {
                self.transport = None;
                (
                    "off".to_owned(),
                    Some("no otlp.endpoint configured".to_owned()),
                )
            }
            Some(endpoint) => match Transport::build(&config) {
                Ok(t) => {
                    tracing::info!(endpoint = %endpoint, protocol = ?config.protocol, "OTLP export configured");
                    self.transport = Some(t);
                    ("running".to_owned(), None)
                }
                Err(e) => {
                    tracing::error!(error = %e, "OTLP export cannot start");
                    self.transport = None;
                    ("failing".to_owned(), Some(e.to_string()))
                }
            },
        };
        let endpoint = config.endpoint.clone();
        let protocol = format!("{:?}", config.protocol).to_ascii_lowercase();
        self.shared.status.update(|s| {
            s.export.state = state;
            s.export.reason = reason;
            s.export.endpoint = endpoint;
            s.export.protocol = protocol;
        });
        let active = Active {
            resource: spans::resource(&self.shared.node, &config.resource),
            config,
        };
        *self
            .shared
            .active
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(active);
    }

    /// Re-reads the synced settings after a change notification.
    fn desired_changed(&mut self) {
        let Some(rx) = self.desired.as_mut() else {
            return;
        };
        let section = rx.borrow_and_update().node_config["export"].clone();
        if section == self.last_override {
            return;
        }
        self.last_override = section.clone();
        match self.base.with_overrides(&section) {
            Ok(config) if config == self.shared.active().config => {}
            Ok(config) => {
                self.shared.status.update(|s| s.export.config_error = None);
                self.apply(config);
            }
            Err(e) => self.config_rejected(&e.to_string()),
        }
    }

    /// Sends one item; on failure records why. Returns whether it may be retried.
    async fn send(&mut self, item: &Item) -> Result<(), ExportError> {
        if self.transport.is_none() {
            // Built at configuration and failed (a TLS or token file missing or bad): try
            // again, so that fixing the file is enough.
            let config = self.shared.active().config.clone();
            if config.endpoint.is_some() {
                match Transport::build(&config) {
                    Ok(t) => self.transport = Some(t),
                    Err(e) => {
                        self.shared.telemetry.failures.inc();
                        let reason = e.to_string();
                        self.shared.status.update(|s| {
                            s.export.state = "failing".to_owned();
                            s.export.reason = Some(reason.clone());
                        });
                        return Err(ExportError::Send {
                            endpoint: config.endpoint.unwrap_or_default(),
                            reason,
                            retryable: true,
                        });
                    }
                }
            }
        }
        let Some(transport) = self.transport.as_mut() else {
            return Err(ExportError::Send {
                endpoint: String::new(),
                reason: "export is not configured".to_owned(),
                retryable: true,
            });
        };
        let result = transport.send(item.signal, item.body.clone()).await;
        let t = &self.shared.telemetry;
        match &result {
            Ok(()) => {
                match item.signal {
                    Signal::Traces => t.trace_batches.inc(),
                    Signal::Metrics => t.metric_batches.inc(),
                };
                let batches = t.trace_batches.get() + t.metric_batches.get();
                self.shared.status.update(|s| {
                    s.export.batches = batches;
                    if s.export.state == "failing" {
                        tracing::info!("OTLP export recovered");
                        s.export.state = "running".to_owned();
                        s.export.reason = None;
                    }
                });
            }
            Err(e) => {
                t.failures.inc();
                let failures = t.failures.get();
                let reason = e.to_string();
                let first = self.shared.status.update(|s| {
                    let first = s.export.state != "failing";
                    s.export.failures = failures;
                    s.export.state = "failing".to_owned();
                    s.export.reason = Some(reason.clone());
                    first
                });
                if first {
                    tracing::warn!(error = %reason, "OTLP export failing; retrying with backoff (counted in edgeward_export_failures_total)");
                }
            }
        }
        result
    }

    /// Delays between retries of a failed request, as the current settings have them.
    fn retry_backoff(&self) -> Backoff {
        let config = &self.shared.active().config;
        Backoff::new(config.retry_initial_backoff, config.retry_max_backoff)
    }

    /// Ships queued requests until `stop` (cancelled by the pipeline once it has pushed its
    /// last batch), then flushes what is queued, giving up at `flush_deadline` after `stop`.
    pub async fn run(mut self, stop: CancellationToken, flush_deadline: Duration) {
        let handle = ExportHandle {
            shared: self.shared.clone(),
        };
        let mut interval = self.shared.active().config.metrics_interval;
        let mut metrics_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight: Option<Item> = None;
        let mut backoff = self.retry_backoff();
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut overflows_seen = self.shared.queue.overflows();
        let mut desired = self.desired.clone();
        loop {
            // The request being retried is the oldest of all: when the queue has had to drop
            // since, drop it too rather than resend stale data first.
            let overflows = self.shared.queue.overflows();
            if overflows != overflows_seen {
                overflows_seen = overflows;
                if let Some(old) = in_flight.take() {
                    self.shared.count_dropped(Dropped {
                        items: 1,
                        spans: old.spans,
                    });
                }
            }
            if in_flight.is_none() {
                in_flight = self.shared.queue.pop();
                self.shared.update_depth();
            }
            let ready =
                in_flight.is_some() && retry_at.is_none_or(|t| t <= tokio::time::Instant::now());
            if ready && let Some(item) = in_flight.take() {
                match self.send(&item).await {
                    Ok(()) => {
                        backoff.reset();
                        retry_at = None;
                    }
                    Err(e) if e.is_retryable() => {
                        retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                        in_flight = Some(item);
                    }
                    Err(_) => {
                        // Rejected for good (bad request, unauthenticated...): drop it.
                        self.shared.count_dropped(Dropped {
                            items: 1,
                            spans: item.spans,
                        });
                        retry_at = None;
                    }
                }
                continue;
            }
            let sleep_until =
                retry_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.shared.queue.pushed(), if in_flight.is_none() => {}
                _ = tokio::time::sleep_until(sleep_until), if in_flight.is_some() => {}
                _ = metrics_tick.tick() => handle.push_metrics(),
                changed = async {
                    match desired.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_err() {
                        desired = None;
                    } else {
                        self.desired = desired.clone();
                        self.desired_changed();
                        let new_interval = self.shared.active().config.metrics_interval;
                        if new_interval != interval {
                            interval = new_interval;
                            metrics_tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                        }
                        backoff = self.retry_backoff();
                        retry_at = None;
                    }
                }
            }
        }
        self.flush(handle, in_flight, flush_deadline).await;
    }

    /// Final flush: the last metrics, then everything queued, one attempt each, until the
    /// deadline; what is left is counted as dropped.
    async fn flush(mut self, handle: ExportHandle, in_flight: Option<Item>, deadline: Duration) {
        handle.push_metrics();
        let until = Instant::now() + deadline;
        let mut next = in_flight.or_else(|| self.shared.queue.pop());
        let mut sent = 0u64;
        while let Some(item) = next {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.transport.is_none() {
                self.shared.count_dropped(Dropped {
                    items: 1,
                    spans: item.spans,
                });
            } else {
                match tokio::time::timeout(left, self.send(&item)).await {
                    Ok(Ok(())) => sent += 1,
                    _ => self.shared.count_dropped(Dropped {
                        items: 1,
                        spans: item.spans,
                    }),
                }
            }
            next = self.shared.queue.pop();
        }
        self.shared.update_depth();
        tracing::info!(
            requests = sent,
            dropped_spans = self.shared.telemetry.dropped_spans.get(),
            "OTLP export flushed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreadable_token_file_fails_export_with_the_path_and_keeps_the_agent() {
        let status = StatusHandle::new("n");
        let config = ExportConfig {
            endpoint: Some("http://127.0.0.1:9".to_owned()),
            bearer_token_file: Some("/nonexistent/edgeward-token".into()),
            ..ExportConfig::default()
        };
        let (_exporter, handle) = Exporter::build(
            &config,
            NodeIdentity::default(),
            status.clone(),
            ExportTelemetry::default(),
            None,
        );
        let export = status.snapshot().export;
        assert_eq!(export.state, "failing");
        let reason = export.reason.unwrap();
        assert!(
            reason.contains("bearer_token_file") && reason.contains("/nonexistent/edgeward-token"),
            "{reason}"
        );
        // The pipeline side keeps working: spans are queued for when it is fixed.
        handle.push_batch(&[crate::export::spans::tests_support::event()]);
        assert_eq!(handle.telemetry().spans.get(), 1);
    }
}
