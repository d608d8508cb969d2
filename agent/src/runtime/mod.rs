//! `edgeward run`: builds every component from the configuration, runs them until SIGTERM or
//! SIGINT, then drains them within `shutdown_timeout`.

mod shutdown;

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet, metrics::family::Family, metrics::gauge::Gauge, registry::Registry,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::AdminError,
    config::{AgentConfig, ConfigError},
    export::{ExportTelemetry, Exporter, spans::NodeIdentity},
    pipeline,
    status::{ConfigSource, StatusHandle},
    sync,
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

    let probe = config.probe.build(&status, &mut registry);

    // Pipeline and export. The probe's events enter through `pipeline_input` (kept alive until
    // the end of `run_until`); synced export settings arrive once sync publishes its
    // DesiredStateRx (None until then), and the plugin chain through a PolicyRx (KeepAll until
    // the plugin host provides one).
    let export_telemetry = ExportTelemetry::default();
    export_telemetry.register(&mut registry);
    let (exporter, export_handle) = Exporter::build(
        &config.otlp,
        NodeIdentity::detect(&node),
        status.clone(),
        export_telemetry.clone(),
        None,
    );
    let (_pipeline_input, pipeline_rx) =
        pipeline::channel(config.otlp.channel_capacity, export_telemetry);

    let admin = config
        .admin
        .build(status.clone(), Arc::new(registry))
        .await?;
    tracing::info!(
        node = %node,
        version = crate::VERSION,
        admin = %admin.local_addr(),
        etcd = ?config.etcd.endpoints,
        "edgeward starting"
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

    if let Some(probe) = probe {
        tasks.spawn(probe.run(Duration::from_secs(1), shutdown.clone()));
    }

    {
        let pipeline_done = CancellationToken::new();
        tasks.spawn(pipeline::run(
            pipeline_rx,
            pipeline::keep_all(),
            export_handle,
            shutdown.clone(),
            pipeline_done.clone(),
        ));
        // Leave a quarter of the shutdown deadline for everything else.
        tasks.spawn(exporter.run(pipeline_done, config.shutdown_timeout * 3 / 4));
    }

    if config.etcd.endpoints.is_empty() {
        match &config.standalone.config_dir {
            Some(dir) => {
                tasks.spawn(sync::file::run(
                    dir.clone(),
                    status.clone(),
                    shutdown.clone(),
                ));
            }
            None => {
                tracing::info!("no etcd endpoints and no standalone.config_dir: built-in defaults");
                status.config_applied(ConfigSource::Default, 0);
            }
        }
    } else {
        tasks.spawn(sync::etcd::run(
            config.etcd.clone(),
            status.clone(),
            shutdown.clone(),
        ));
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
