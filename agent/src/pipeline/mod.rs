//! The pipeline from the probe to the exporters: enrichment, batching, the plugin chain.
//!
//! Every hop is a bounded channel; when one is full the sender drops and counts, so nothing
//! ever blocks the probe's ring-buffer reader. The probe sends through a [`PipelineInput`]
//! (a bounded channel whose `send` never waits); [`run`] batches by size and time, applies the
//! current plugin chain to each batch and hands it to the exporter, whose queue drops its
//! oldest requests when full.

use std::{sync::Arc, time::Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    export::{ExportHandle, ExportTelemetry},
    probe::event::ConnectionEvent,
};

/// What the plugin chain does to a batch, seen from the pipeline.
///
/// `apply` removes the events the policy drops and appends the attribute edits it makes to
/// the ones it keeps. It never fails: a failing plugin's `failure_policy` decides inside.
pub trait BatchPolicy: Send + Sync + 'static {
    /// Applies the policy to a batch in place.
    fn apply(&self, batch: &mut Vec<ConnectionEvent>);
}

/// The policy that keeps everything unchanged (no plugins).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeepAll;

impl BatchPolicy for KeepAll {
    fn apply(&self, _batch: &mut Vec<ConnectionEvent>) {}
}

/// The current policy. The plugin host sends a new chain on swap; the pipeline takes the
/// current one per batch, so a batch in flight finishes on the chain it started with.
pub type PolicyRx = tokio::sync::watch::Receiver<Arc<dyn BatchPolicy>>;

/// A policy receiver that always holds [`KeepAll`] (no plugin host).
pub fn keep_all() -> PolicyRx {
    let (tx, rx) = tokio::sync::watch::channel::<Arc<dyn BatchPolicy>>(Arc::new(KeepAll));
    // The value stays readable after the sender is gone.
    drop(tx);
    rx
}

/// The probe's end of the pipeline channel.
#[derive(Debug, Clone)]
pub struct PipelineInput {
    tx: mpsc::Sender<ConnectionEvent>,
    telemetry: ExportTelemetry,
}

impl PipelineInput {
    /// Hands an event to the pipeline without waiting. When the channel is full (or the
    /// pipeline has stopped) the event is dropped and counted in
    /// `edgeward_pipeline_channel_drops_total`; returns whether it was accepted.
    pub fn send(&self, event: ConnectionEvent) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(_) => {
                if self.telemetry.channel_drops.inc() == 0 {
                    tracing::warn!(
                        "pipeline channel full: dropping events (counted in edgeward_pipeline_channel_drops_total)"
                    );
                }
                false
            }
        }
    }
}

impl PipelineInput {
    /// Free slots in the channel now (a producer that may wait, like a benchmark, can pace
    /// itself with this; the probe never waits).
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }
}

/// The bounded channel from the probe to the pipeline.
pub fn channel(
    capacity: usize,
    telemetry: ExportTelemetry,
) -> (PipelineInput, mpsc::Receiver<ConnectionEvent>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (PipelineInput { tx, telemetry }, rx)
}

/// Batches events from `rx` by size and time (`otlp.batch_size`, `otlp.batch_timeout`, read
/// per batch so they change live), applies the current policy from `policy` to each batch
/// and hands it to `export`. On `shutdown` it stops intake, drains what the channel already
/// holds, pushes the last batch and cancels `done` so the exporter flushes.
pub async fn run(
    mut rx: mpsc::Receiver<ConnectionEvent>,
    policy: PolicyRx,
    export: ExportHandle,
    shutdown: CancellationToken,
    done: CancellationToken,
) {
    let telemetry = export.telemetry().clone();
    let mut batch: Vec<ConnectionEvent> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let config = export.config();
        let sleep_until = deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(3600));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            received = rx.recv() => match received {
                Some(ev) => {
                    if batch.is_empty() {
                        deadline = Some(tokio::time::Instant::now() + config.batch_timeout);
                        batch.reserve(config.batch_size);
                    }
                    batch.push(ev);
                    // Take what is already waiting without going back to the scheduler.
                    while batch.len() < config.batch_size {
                        match rx.try_recv() {
                            Ok(ev) => batch.push(ev),
                            Err(_) => break,
                        }
                    }
                    if batch.len() >= config.batch_size {
                        flush(&mut batch, &policy, &export, &telemetry);
                        deadline = None;
                    }
                }
                // Every sender is gone: nothing more will come; wait for shutdown.
                None => {
                    flush(&mut batch, &policy, &export, &telemetry);
                    shutdown.cancelled().await;
                    break;
                }
            },
            _ = tokio::time::sleep_until(sleep_until), if deadline.is_some() => {
                flush(&mut batch, &policy, &export, &telemetry);
                deadline = None;
            }
        }
    }
    // Stop intake, then take what is already in the channel.
    rx.close();
    let size = export.config().batch_size;
    while let Ok(ev) = rx.try_recv() {
        batch.push(ev);
        if batch.len() >= size {
            flush(&mut batch, &policy, &export, &telemetry);
        }
    }
    flush(&mut batch, &policy, &export, &telemetry);
    tracing::debug!("pipeline drained");
    done.cancel();
}

fn flush(
    batch: &mut Vec<ConnectionEvent>,
    policy: &PolicyRx,
    export: &ExportHandle,
    telemetry: &ExportTelemetry,
) {
    if batch.is_empty() {
        return;
    }
    let received = batch.len();
    telemetry.events.inc_by(received as u64);
    telemetry.pipeline_batches.inc();
    let current = policy.borrow().clone();
    let started = Instant::now();
    current.apply(batch);
    let took = started.elapsed();
    telemetry.plugin_latency.observe(took.as_secs_f64());
    telemetry
        .plugin_nanos
        .inc_by(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    telemetry.plugin_calls.inc();
    telemetry
        .plugin_dropped
        .inc_by(received.saturating_sub(batch.len()) as u64);
    export.push_batch(batch);
    batch.clear();
}
