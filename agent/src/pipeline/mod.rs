//! The pipeline from the probe to the exporters: enrichment, batching, the plugin chain.
//!
//! Every hop is a bounded channel; when one is full the sender drops and counts, so nothing
//! ever blocks the probe's ring-buffer reader.

use std::sync::Arc;

use crate::probe::event::ConnectionEvent;

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
