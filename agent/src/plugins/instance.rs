//! One plugin instance: its store (memory and table limits), the deadline on every call, the
//! translation of the batch to the flat layout and of the verdicts back, and what a failure
//! does to the batch.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use edgeward_plugin_abi::{self as abi, Encoder, Record};
use wasmtime::{Store, Trap};

use super::{
    FailurePolicy, PluginError, PluginManifest,
    engine::{EPOCH_TICK, HostState, Plugin, PluginPre, PluginRuntime, exports},
    metrics::PluginHandles,
};
use crate::{
    probe::event::{AttrEdit, AttrValue, CloseReason, ConnectionEvent, Direction, EventKind},
    status::{PluginState, StatusHandle},
};

/// What one batch call did.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchResult {
    /// The plugin answered; verdicts applied.
    Applied,
    /// The plugin failed; its failure policy was applied.
    Failed(PluginError),
    /// The plugin is disabled; its failure policy was applied without calling it.
    Skipped,
}

struct Live {
    instance: Option<(Store<HostState>, Plugin)>,
    encoder: Encoder,
    failures: u32,
    disabled: bool,
}

/// A loaded, initialised plugin.
pub struct PluginInstance {
    name: Arc<str>,
    sha256: String,
    config_json: String,
    failure_policy: FailurePolicy,
    timeout: Duration,
    memory_mib: u32,
    max_failures: u32,
    pre: PluginPre<HostState>,
    runtime: Arc<PluginRuntime>,
    handles: PluginHandles,
    status: Option<StatusHandle>,
    manifest: PluginManifest,
    live: Mutex<Live>,
}

impl std::fmt::Debug for PluginInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginInstance")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl PluginInstance {
    /// Instantiates a prepared component and runs its `init` with the manifest's config.
    /// `timeout` and `memory_mib` are the manifest's limits after the agent's caps.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        runtime: &Arc<PluginRuntime>,
        manifest: &PluginManifest,
        pre: PluginPre<HostState>,
        timeout: Duration,
        memory_mib: u32,
        max_failures: u32,
        status: Option<StatusHandle>,
    ) -> Result<Arc<Self>, PluginError> {
        let config_json = manifest.config.to_string();
        let this = Self {
            name: Arc::from(manifest.name.as_str()),
            sha256: manifest.sha256.clone(),
            config_json,
            failure_policy: manifest.failure_policy,
            timeout,
            memory_mib,
            max_failures,
            pre,
            runtime: runtime.clone(),
            handles: runtime.metrics().handles(&manifest.name),
            status,
            manifest: manifest.clone(),
            live: Mutex::new(Live {
                instance: None,
                encoder: Encoder::new(),
                failures: 0,
                disabled: false,
            }),
        };
        let instance = this.instantiate()?;
        this.lock().instance = Some(instance);
        Ok(Arc::new(this))
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sha256 of its module.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The manifest it was started from.
    pub fn manifest(&self) -> &PluginManifest {
        &self.manifest
    }

    /// Whether it was disabled after repeated failures.
    pub fn is_disabled(&self) -> bool {
        self.lock().disabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        // A panic inside a call leaves at worst a poisoned instance, which the next call
        // replaces; keep going.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deadline_ticks(&self) -> u64 {
        let ticks = self.timeout.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64;
        // One more tick: the current one may be about to end.
        ticks.max(1) + 1
    }

    /// A fresh instance (new store, new memory) with `init` run on it.
    fn instantiate(&self) -> Result<(Store<HostState>, Plugin), PluginError> {
        let _ticking = self.runtime.ticking();
        let mut store = self.runtime.store(&self.name, self.memory_mib);
        store.set_epoch_deadline(self.deadline_ticks());
        let plugin = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(&store, "instantiate", e))?;
        store.set_epoch_deadline(self.deadline_ticks());
        match plugin
            .edgeward_policy_policy()
            .call_init(&mut store, &self.config_json)
        {
            Ok(Ok(())) => Ok((store, plugin)),
            Ok(Err(message)) => Err(PluginError::InitRejected {
                plugin: self.name.to_string(),
                message,
            }),
            Err(e) => Err(self.classify(&store, "init", e)),
        }
    }

    fn classify(
        &self,
        store: &Store<HostState>,
        call: &'static str,
        e: wasmtime::Error,
    ) -> PluginError {
        let plugin = self.name.to_string();
        if store.data().memory_limit_hit {
            return PluginError::MemoryLimit {
                plugin,
                call,
                limit_mib: self.memory_mib,
            };
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PluginError::Timeout {
                plugin,
                call,
                limit: self.timeout,
            },
            Some(Trap::StackOverflow) => PluginError::StackOverflow { plugin, call },
            _ => PluginError::Trap {
                plugin,
                call,
                reason: one_line(&format!("{e:#}")),
            },
        }
    }

    /// Runs the plugin on `batch` in place: drops what it drops, appends its edits. On error
    /// the failure policy decides: `fail_open` leaves the batch unchanged, `fail_closed`
    /// empties it.
    pub fn run(&self, batch: &mut Vec<ConnectionEvent>) -> BatchResult {
        let mut live = self.lock();
        if live.disabled {
            self.fail_batch(batch);
            return BatchResult::Skipped;
        }
        let started = Instant::now();
        let result = self.call(&mut live, batch);
        self.handles
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                live.failures = 0;
                BatchResult::Applied
            }
            Err(error) => {
                live.instance = None;
                live.failures += 1;
                self.runtime.metrics().error(&self.name, error.kind());
                self.fail_batch(batch);
                let mut reported = error.clone();
                if live.failures >= self.max_failures {
                    live.disabled = true;
                    reported = PluginError::Disabled {
                        plugin: self.name.to_string(),
                        failures: live.failures,
                        last: error.to_string(),
                    };
                    tracing::error!(plugin = %self.name, failures = live.failures, error = %error, "plugin disabled");
                } else if live.failures == 1 {
                    tracing::warn!(plugin = %self.name, error = %error, "plugin call failed");
                }
                self.report(PluginState::Failed, Some(reported.to_string()));
                if live.disabled {
                    return BatchResult::Failed(reported);
                }
                BatchResult::Failed(error)
            }
        }
    }

    fn fail_batch(&self, batch: &mut Vec<ConnectionEvent>) {
        if self.failure_policy == FailurePolicy::FailClosed {
            batch.clear();
        }
    }

    fn report(&self, state: PluginState, last_error: Option<String>) {
        if let Some(status) = &self.status {
            status.update(|s| {
                if let Some(p) = s
                    .plugins
                    .iter_mut()
                    .find(|p| *p.name == *self.name && p.sha256 == self.sha256)
                {
                    p.state = state;
                    p.last_error = last_error;
                }
            });
        }
    }

    fn call(&self, live: &mut Live, batch: &mut Vec<ConnectionEvent>) -> Result<(), PluginError> {
        if live.instance.is_none() {
            // The previous call failed and took the instance with it; start afresh.
            live.instance = Some(self.instantiate()?);
        }
        let Live {
            instance, encoder, ..
        } = live;
        let Some((store, plugin)) = instance.as_mut() else {
            return Ok(());
        };
        encoder.clear();
        for event in batch.iter() {
            encoder.push(&record(event));
        }
        let bytes = encoder.finish();
        let _ticking = self.runtime.ticking();
        store.set_epoch_deadline(self.deadline_ticks());
        self.handles.calls.inc();
        self.handles.events.inc_by(batch.len() as u64);
        let verdicts = plugin
            .edgeward_policy_policy()
            .call_on_batch(&mut *store, bytes)
            .map_err(|e| self.classify(store, "on-batch", e))?;
        self.apply_verdicts(verdicts, batch)
    }

    fn apply_verdicts(
        &self,
        verdicts: exports::Verdicts,
        batch: &mut Vec<ConnectionEvent>,
    ) -> Result<(), PluginError> {
        let bad = |reason: String| PluginError::BadVerdicts {
            plugin: self.name.to_string(),
            reason,
        };
        let n = batch.len();
        if verdicts.codes.len() != n {
            return Err(bad(format!(
                "{} verdict codes for {n} events",
                verdicts.codes.len()
            )));
        }
        if let Some((i, code)) = verdicts
            .codes
            .iter()
            .enumerate()
            .find(|(_, c)| **c > abi::DROP)
        {
            return Err(bad(format!(
                "verdict code {code} for event {i} (0 keep, 1 drop)"
            )));
        }
        if let Some(e) = verdicts.edits.iter().find(|e| e.event as usize >= n) {
            return Err(bad(format!(
                "edit of {:?} names event {} of a batch of {n}",
                e.key, e.event
            )));
        }
        let mut edited = 0u64;
        for edit in verdicts.edits {
            let i = edit.event as usize;
            if verdicts.codes[i] != abi::KEEP {
                continue;
            }
            let key: Arc<str> = Arc::from(edit.key);
            batch[i].edits.push(match edit.value {
                None => AttrEdit::Remove(key),
                Some(v) => AttrEdit::Set(key, attr_value(v)),
            });
            edited += 1;
        }
        let dropped = verdicts.codes.iter().filter(|c| **c == abi::DROP).count();
        if dropped > 0 {
            let mut i = 0;
            batch.retain(|_| {
                let keep = verdicts.codes[i] == abi::KEEP;
                i += 1;
                keep
            });
        }
        self.handles.keep.inc_by((n - dropped) as u64);
        self.handles.drop.inc_by(dropped as u64);
        self.handles.edit.inc_by(edited);
        Ok(())
    }
}

fn attr_value(v: exports::AttrValue) -> AttrValue {
    match v {
        exports::AttrValue::Text(s) => AttrValue::Str(Arc::from(s)),
        exports::AttrValue::Integer(i) => AttrValue::Int(i),
        exports::AttrValue::Float(f) => AttrValue::Float(f),
        exports::AttrValue::Boolean(b) => AttrValue::Bool(b),
    }
}

/// The flat-layout view of an event.
pub(crate) fn record(e: &ConnectionEvent) -> Record<'_> {
    Record {
        kind: match e.kind {
            EventKind::Open => abi::Kind::Open,
            EventKind::Update => abi::Kind::Update,
            EventKind::Close => abi::Kind::Close,
        },
        conn_id: e.conn_id,
        direction: match e.direction {
            Direction::Active => abi::Direction::Active,
            Direction::Passive => abi::Direction::Passive,
        },
        local: e.local,
        peer: e.peer,
        pid: e.pid,
        tgid: e.tgid,
        comm: &e.comm,
        cgroup_id: e.cgroup_id,
        netns: e.netns,
        start_unix_nanos: e.start_unix_nanos,
        end_unix_nanos: e.end_unix_nanos,
        bytes_sent: e.bytes_sent,
        bytes_received: e.bytes_received,
        srtt_us: e.srtt_us,
        rttvar_us: e.rttvar_us,
        retransmits: e.retransmits,
        close_reason: match e.close_reason {
            CloseReason::Open => abi::CloseReason::Open,
            CloseReason::Normal => abi::CloseReason::Normal,
            CloseReason::Reset => abi::CloseReason::Reset,
            CloseReason::Refused => abi::CloseReason::Refused,
            CloseReason::TimedOut => abi::CloseReason::TimedOut,
        },
        executable: e.executable.as_deref(),
        container_id: e.container_id.as_deref(),
        pod_uid: e.pod_uid.as_deref(),
        started_before_probe: e.started_before_probe,
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(4)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::spans::tests_support::event;

    #[test]
    fn the_flat_record_carries_every_field_a_plugin_reads() {
        let mut e = event();
        e.started_before_probe = true;
        let mut encoder = abi::Encoder::new();
        encoder.push(&record(&e));
        e.started_before_probe = false;
        encoder.push(&record(&e));
        let bytes = encoder.finish().to_vec();
        let batch = abi::BatchView::parse(&bytes).unwrap();
        let (a, b) = (batch.get(0).unwrap(), batch.get(1).unwrap());
        assert_eq!((a.conn_id(), a.tgid(), a.comm()), (7, 99, "curl"));
        assert_eq!(a.close_reason(), abi::CloseReason::Reset);
        assert_eq!((a.local(), a.peer()), (e.local, e.peer));
        assert!(a.started_before_probe() && !b.started_before_probe());
    }
}
