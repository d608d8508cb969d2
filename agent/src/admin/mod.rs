//! The admin HTTP server: `/healthz`, `/readyz`, `/status` (JSON) and `/metrics` (Prometheus
//! text). Bound to loopback by default: it tells anyone who can reach it what the node runs.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::StatusHandle;

/// `[admin]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on. Keep it on loopback unless something else guards it.
    pub addr: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address could not be bound.
    #[error("admin server: cannot listen on {addr} (admin.addr): {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("admin server on {addr}: {source}")]
    Serve {
        /// The address it listened on.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A bound admin server, ready to run.
pub struct AdminServer {
    listener: TcpListener,
    addr: SocketAddr,
    state: AdminState,
}

#[derive(Clone)]
struct AdminState {
    status: StatusHandle,
    registry: Arc<Registry>,
}

impl AdminConfig {
    /// Binds the listener, so that a taken port fails start-up rather than a background task.
    pub async fn build(
        &self,
        status: StatusHandle,
        registry: Arc<Registry>,
    ) -> Result<AdminServer, AdminError> {
        let listener = TcpListener::bind(self.addr)
            .await
            .map_err(|source| AdminError::Bind {
                addr: self.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| AdminError::Bind {
            addr: self.addr,
            source,
        })?;
        Ok(AdminServer {
            listener,
            addr,
            state: AdminState { status, registry },
        })
    }
}

impl AdminServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` is cancelled, then finishes the requests in flight.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AdminError> {
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/status", get(status))
            .route("/metrics", get(metrics))
            .with_state(self.state);
        tracing::info!(addr = %self.addr, "admin server listening");
        let addr = self.addr;
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|source| AdminError::Serve { addr, source })
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let (ready, waiting) = state
        .status
        .read(|s| (s.ready, s.config.last_error.clone()));
    if ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = waiting.unwrap_or_else(|| "no configuration applied yet".to_owned());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response()
    }
}

async fn status(State(state): State<AdminState>) -> impl IntoResponse {
    Json(state.status.snapshot())
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics encoding failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            )
                .into_response()
        }
    }
}
