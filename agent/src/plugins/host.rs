//! The plugin host task: turns each desired state into a chain and swaps it in atomically.
//!
//! For every change: fetch each module (etcd blob or https URL), check its sha256, compile it
//! (or load it from the compile cache), link it, instantiate it and run `init` with its config
//! — all off the data path, on a blocking thread. Only when every plugin of the new state is
//! ready is the new chain sent to the pipeline; batches in flight finish on the old one. If any
//! step fails, the last good chain stays, and `/status` and the metrics say why; a failure that
//! may pass by itself (a download, an `init` out of time) is tried again after a backoff.

use std::{
    collections::HashMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasmtime::component::Component;

use super::{
    Chain, PluginError, PluginManifest, PluginMetrics, PluginRuntime, PluginsConfig,
    fetch::module_bytes, instance::PluginInstance,
};
use crate::{
    backoff::Backoff,
    pipeline::{BatchPolicy, PolicyRx},
    status::{PluginState, PluginStatus, StatusHandle},
    sync::{DesiredState, DesiredStateRx},
};

/// Compiled components kept in memory beyond those of the current chain (for rollbacks).
const KEEP_COMPONENTS: usize = 16;

/// First and longest wait before a change that failed transiently
/// ([`PluginError::is_transient`]) is tried again, with nothing changed.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MOST: Duration = Duration::from_secs(300);

/// What a successful swap did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwapOutcome {
    /// The chain now active, by name, in order.
    pub plugins: Vec<String>,
    /// Instances kept from the previous chain (manifest unchanged).
    pub reused: usize,
    /// Modules compiled for this swap.
    pub compiled: usize,
    /// Modules loaded from the disk cache for this swap.
    pub from_cache: usize,
    /// How long it took.
    pub took: Duration,
}

/// The plugin host.
pub struct PluginHost {
    runtime: Arc<PluginRuntime>,
    config: PluginsConfig,
    status: StatusHandle,
    tx: watch::Sender<Arc<dyn BatchPolicy>>,
    current: Vec<Arc<PluginInstance>>,
    components: HashMap<String, Component>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl PluginHost {
    /// Builds the host from `[plugins]`: the engine, the compile cache (default
    /// `<cache_dir>/modules`), metrics in `registry`. Returns the host and the receiver the
    /// pipeline reads the current chain from (empty chain at first).
    pub fn build(
        config: &PluginsConfig,
        cache_dir: &Path,
        status: StatusHandle,
        registry: &mut Registry,
    ) -> Result<(Self, PolicyRx), PluginError> {
        let metrics = PluginMetrics::register(registry);
        let dir = config
            .module_cache_dir
            .clone()
            .unwrap_or_else(|| cache_dir.join("modules"));
        let runtime = PluginRuntime::new(Some(dir), metrics)?;
        Ok(Self::new(runtime, config.clone(), status))
    }

    /// A host on an existing runtime.
    pub fn new(
        runtime: Arc<PluginRuntime>,
        config: PluginsConfig,
        status: StatusHandle,
    ) -> (Self, PolicyRx) {
        let empty: Arc<dyn BatchPolicy> = Arc::new(Chain::default());
        let (tx, rx) = watch::channel(empty);
        (
            Self {
                runtime,
                config,
                status,
                tx,
                current: Vec::new(),
                components: HashMap::new(),
            },
            rx,
        )
    }

    /// The runtime (engine, metrics).
    pub fn runtime(&self) -> &Arc<PluginRuntime> {
        &self.runtime
    }

    /// The instances of the active chain, in order.
    pub fn current(&self) -> &[Arc<PluginInstance>] {
        &self.current
    }

    /// Builds the chain for `desired` and swaps it in; on error keeps the current chain.
    /// Blocking (compiles): call it off the async runtime.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<SwapOutcome, PluginError> {
        let started = Instant::now();
        let mut outcome = SwapOutcome::default();
        let mut next = Vec::with_capacity(desired.plugins.len());
        for manifest in &desired.plugins {
            let built = match self.current.iter().find(|p| p.manifest() == manifest) {
                Some(same) => {
                    outcome.reused += 1;
                    Ok(same.clone())
                }
                None => self.start(desired, manifest, &mut outcome),
            };
            match built {
                Ok(instance) => next.push(instance),
                Err(error) => {
                    self.reject(manifest, &error);
                    return Err(error);
                }
            }
        }
        outcome.plugins = next.iter().map(|p| p.name().to_owned()).collect();
        self.current = next;
        let chain: Arc<dyn BatchPolicy> = Arc::new(Chain::new(self.current.clone()));
        self.tx.send_replace(chain);
        let entries = status_entries(&self.current);
        self.status.update(|s| s.plugins = entries);
        if self.components.len() > self.current.len() + KEEP_COMPONENTS {
            let keep: Vec<&str> = self.current.iter().map(|p| p.sha256()).collect();
            self.components
                .retain(|sha, _| keep.contains(&sha.as_str()));
        }
        self.runtime.metrics().swap("applied");
        outcome.took = started.elapsed();
        tracing::info!(
            revision = desired.revision,
            plugins = ?outcome.plugins,
            reused = outcome.reused,
            compiled = outcome.compiled,
            from_cache = outcome.from_cache,
            ms = outcome.took.as_secs_f64() * 1e3,
            "plugin chain swapped"
        );
        Ok(outcome)
    }

    fn start(
        &mut self,
        desired: &DesiredState,
        manifest: &PluginManifest,
        outcome: &mut SwapOutcome,
    ) -> Result<Arc<PluginInstance>, PluginError> {
        if let Some(capability) = manifest
            .capabilities
            .iter()
            .find(|c| !self.config.allowed_capabilities.contains(c))
        {
            return Err(PluginError::Capability {
                plugin: manifest.name.clone(),
                capability: *capability,
            });
        }
        let component = match self.components.get(&manifest.sha256) {
            Some(c) => c.clone(),
            None => {
                let c = match self.runtime.cached(&manifest.name, &manifest.sha256) {
                    Some(c) => {
                        outcome.from_cache += 1;
                        c
                    }
                    None => {
                        let bytes = module_bytes(desired, manifest, &self.config)?;
                        let c = self
                            .runtime
                            .compile(&manifest.name, &manifest.sha256, &bytes)?;
                        outcome.compiled += 1;
                        c
                    }
                };
                self.components.insert(manifest.sha256.clone(), c.clone());
                c
            }
        };
        let pre = self
            .runtime
            .prepare(&manifest.name, &component, &manifest.capabilities)?;
        let timeout = manifest
            .limits
            .batch_timeout
            .min(self.config.max_batch_timeout);
        let memory = manifest.limits.memory_mib.min(self.config.max_memory_mib);
        PluginInstance::start(
            &self.runtime,
            manifest,
            pre,
            timeout,
            memory,
            self.config.max_consecutive_failures,
            Some(self.status.clone()),
        )
    }

    fn reject(&self, manifest: &PluginManifest, error: &PluginError) {
        self.runtime.metrics().swap("rejected");
        self.runtime.metrics().error(&manifest.name, error.kind());
        tracing::warn!(plugin = %manifest.name, sha256 = %manifest.sha256, error = %error, "plugin change rejected; last good chain kept");
        let mut entries = status_entries(&self.current);
        entries.push(PluginStatus {
            name: manifest.name.clone(),
            sha256: manifest.sha256.clone(),
            state: PluginState::Failed,
            last_error: Some(format!("not applied, last good chain kept: {error}")),
        });
        self.status.update(|s| s.plugins = entries);
    }

    /// Applies every desired state it receives until `shutdown`. A state that failed
    /// transiently (a download, an `init` out of time) is applied again after a backoff (1 s
    /// doubling to 5 min, jittered), until it succeeds or the next state replaces it; one
    /// that failed otherwise waits for the next state.
    pub async fn run(mut self, mut desired: DesiredStateRx, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MOST);
        let mut state = desired.borrow_and_update().clone();
        loop {
            let applying = state.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let result = self.apply(&applying);
                (self, result)
            })
            .await;
            let retry = match joined {
                Ok((host, result)) => {
                    self = host;
                    match result {
                        Err(e) if e.is_transient() => {
                            let delay = backoff.next_delay();
                            self.retrying(&e, delay);
                            Some(delay)
                        }
                        _ => None,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "plugin host stopped: swap task panicked");
                    return;
                }
            };
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    state = desired.borrow_and_update().clone();
                    backoff.reset();
                }
                () = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Says in the log and `/status` that the rejected change will be tried again.
    fn retrying(&self, error: &PluginError, delay: Duration) {
        let delay = Duration::from_millis(delay.as_millis() as u64);
        tracing::warn!(error = %error, retry_in = %humantime::format_duration(delay), "plugin change failed for a reason that may pass; trying it again");
        let note = format!("; trying again in {}", humantime::format_duration(delay));
        self.status.update(|s| {
            if let Some(last) = s
                .plugins
                .iter_mut()
                .rev()
                .find(|p| p.state == PluginState::Failed)
                .and_then(|p| p.last_error.as_mut())
            {
                last.push_str(&note);
            }
        });
    }
}

fn status_entries(chain: &[Arc<PluginInstance>]) -> Vec<PluginStatus> {
    chain
        .iter()
        .map(|p| PluginStatus {
            name: p.name().to_owned(),
            sha256: p.sha256().to_owned(),
            state: if p.is_disabled() {
                PluginState::Failed
            } else {
                PluginState::Active
            },
            last_error: None,
        })
        .collect()
}
