//! `edgeward run`: builds every component from the configuration, runs them until SIGTERM or
//! SIGINT, then drains them within `shutdown_timeout`.

pub mod allocator;
mod shutdown;

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet, metrics::family::Family, metrics::gauge::Gauge, registry::Registry,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use tokio::sync::watch;

use crate::{
    admin::AdminError,
    config::{AgentConfig, ConfigError},
    export::{ExportTelemetry, Exporter, spans::NodeIdentity},
    pipeline,
    plugins::{PluginError, PluginHost},
    status::{ConfigSource, StatusHandle},
    sync::{self, Applier, DesiredState, SyncMetrics},
};

pub use shutdown::{ShutdownSignal, wait_for_signal};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The admin server could not start or failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The plugin host could not start (engine, compile cache directory).
    #[error("plugin host: {0}")]
    Plugins(#[from] PluginError),
    /// Tasks were still running when the shutdown deadline passed.
    #[error("shutdown: {pending} task(s) still running after shutdown_timeout ({timeout:?})")]
    DrainTimeout {
        /// How many tasks had not finished.
        pending: usize,
        /// The deadline.
        timeout: Duration,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Runs the agent until a shutdown signal, then drains. Returns once everything has stopped.
pub async fn run(config: AgentConfig) -> Result<(), RunError> {
    run_until(config, wait_for_signal()).await
}

/// [`run`], stopping when `stop` completes instead of on a signal.
pub async fn run_until(
    config: AgentConfig,
    stop: impl Future<Output = ShutdownSignal>,
) -> Result<(), RunError> {
    let node = config.resolved_node_name()?;
    let status = StatusHandle::new(&node);
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let mut registry = Registry::default();
    let build_info = Family::<BuildLabels, Gauge>::default();
    build_info
        .get_or_create(&BuildLabels {
            version: crate::VERSION.to_owned(),
        })
        .set(1);
    registry.register(
        "edgeward_build_info",
        "edgeward's version; always 1",
        build_info,
    );

    // The probe's enriched events are the pipeline's input; without a probe the pipeline
    // still runs (and exports self-telemetry) on a channel nothing writes to.
    let mut probe_events = None;
    if let Some(mut probe) = config.probe.build(&status, &mut registry) {
        probe_events = probe.take_events();
        tasks.spawn(probe.run(shutdown.clone()));
    }
    // Loading the probe parsed the kernel's BTF; hand those megabytes back to the kernel.
    allocator::release_free_memory();

    // Desired state: one value, swapped whole, for every component that follows it.
    let (state_tx, state_rx) = watch::channel(Arc::new(DesiredState::empty(ConfigSource::Default)));
    let sync_metrics = SyncMetrics::register(&mut registry);
    let mut applier = Applier::new(
        &config.etcd.prefix,
        &node,
        state_tx,
        status.clone(),
        sync_metrics.clone(),
    );
    if !config.etcd.endpoints.is_empty() {
        let on_disk = load_cache(&config, &mut applier, &status);
        let (cache_tx, cache_rx) = watch::channel(None);
        applier = applier.with_cache(cache_tx);
        tasks.spawn(sync::cache::run_writer(
            config.cache.dir.clone(),
            config.etcd.prefix.clone(),
            cache_rx,
            on_disk,
            sync_metrics.clone(),
        ));
        tasks.spawn(sync::etcd::run(
            config.etcd.clone(),
            applier,
            status.clone(),
            sync_metrics.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(sync::node_status::run(
            config.etcd.clone(),
            node.clone(),
            status.clone(),
            sync_metrics,
            shutdown.clone(),
        ));
    } else if let Some(dir) = &config.standalone.config_dir {
        tasks.spawn(sync::file::run(
            dir.clone(),
            config.etcd.prefix.clone(),
            applier,
            status.clone(),
            shutdown.clone(),
        ));
    } else {
        tracing::info!("no etcd endpoints and no standalone.config_dir: built-in defaults");
        applier.reset(sync::Snapshot::default(), ConfigSource::Default);
    }

    // Pipeline and export: probe events -> batches -> plugin chain -> OTLP. Export settings
    // follow the synced `export` section.
    // The plugin host follows the desired state's plugins and hands the pipeline each new
    // chain; batches in flight finish on the chain they started with.
    let (plugin_host, policy) = PluginHost::build(
        &config.plugins,
        &config.cache.dir,
        status.clone(),
        &mut registry,
    )?;
    let export_telemetry = ExportTelemetry {
        plugin_errors: plugin_host.runtime().metrics().errors_total(),
        ..ExportTelemetry::default()
    };
    tasks.spawn(plugin_host.run(state_rx.clone(), shutdown.clone()));
    export_telemetry.register(&mut registry);
    let (exporter, export_handle) = Exporter::build(
        &config.otlp,
        NodeIdentity::detect(&node),
        status.clone(),
        export_telemetry.clone(),
        Some(state_rx.clone()),
    );
    let (_idle_input, idle_rx) = pipeline::channel(1, export_telemetry);
    let pipeline_rx = probe_events.unwrap_or(idle_rx);

    let admin = config
        .admin
        .build(status.clone(), Arc::new(registry))
        .await?;
    tracing::info!(
        node = %node,
        version = crate::VERSION,
        admin = %admin.local_addr(),
        etcd = ?config.etcd.endpoints,
        "edgeward started"
    );
    // The admin server is the one task whose failure stops the agent: without it nobody can
    // see what the node is doing.
    let admin_failed = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        let admin_failed = admin_failed.clone();
        tasks.spawn(async move {
            if let Err(e) = admin.run(shutdown).await {
                tracing::error!(error = %e, "admin server stopped");
                admin_failed.cancel();
            }
        });
    }
    {
        let pipeline_done = CancellationToken::new();
        tasks.spawn(pipeline::run(
            pipeline_rx,
            policy,
            export_handle,
            shutdown.clone(),
            pipeline_done.clone(),
        ));
        // Leave a quarter of the shutdown deadline for everything else.
        tasks.spawn(exporter.run(pipeline_done, config.shutdown_timeout * 3 / 4));
    }
    tasks.close();

    tokio::select! {
        signal = stop => tracing::info!(%signal, "shutting down"),
        _ = admin_failed.cancelled() => tracing::error!("shutting down: admin server failed"),
    }
    shutdown.cancel();

    let drained = tokio::time::timeout(config.shutdown_timeout, tasks.wait()).await;
    match drained {
        Ok(()) if !admin_failed.is_cancelled() => {
            tracing::info!("edgeward stopped");
            Ok(())
        }
        Ok(()) => Err(RunError::Admin(AdminError::Serve {
            addr: config.admin.addr,
            source: std::io::Error::other("admin server stopped unexpectedly"),
        })),
        Err(_) => Err(RunError::DrainTimeout {
            pending: tasks.len(),
            timeout: config.shutdown_timeout,
        }),
    }
}

/// Applies the offline cache, if there is a good one, so the agent is ready before etcd
/// answers. Returns the revision on disk (0 when none), below which the cache writer must not
/// go.
fn load_cache(config: &AgentConfig, applier: &mut Applier, status: &StatusHandle) -> i64 {
    match sync::cache::load(&config.cache.dir, &config.etcd.prefix) {
        Ok(Some(cached)) => {
            let revision = cached.snapshot.revision;
            tracing::info!(
                dir = %config.cache.dir.display(),
                revision,
                age = ?cached.age(),
                "serving from the offline cache until etcd answers"
            );
            applier.reset(cached.snapshot, ConfigSource::Cache);
            status.update(|s| s.config.cache_written_at = Some(cached.written_at));
            revision
        }
        Ok(None) => {
            tracing::info!(dir = %config.cache.dir.display(), "no offline cache yet");
            0
        }
        Err(e) => {
            tracing::error!(error = %e, "offline cache not used; waiting for etcd");
            status.update(|s| s.config.cache_error = Some(e.to_string()));
            0
        }
    }
}
