//! The one way the agent stops: SIGTERM or SIGINT.

use std::fmt;

use tokio::signal::unix::{SignalKind, signal};

/// What asked the agent to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownSignal {
    /// SIGTERM (Kubernetes, systemd).
    Terminate,
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// The caller's own future completed (tests, embedding).
    Requested,
}

impl fmt::Display for ShutdownSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
            Self::Requested => "requested",
        })
    }
}

/// Completes on the first SIGTERM or SIGINT. A second one during the drain ends the process at
/// once with the conventional exit code, for an operator who does not want to wait.
pub async fn wait_for_signal() -> ShutdownSignal {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; the agent can only be killed");
        return std::future::pending().await;
    };
    let first = tokio::select! {
        _ = term.recv() => ShutdownSignal::Terminate,
        _ = int.recv() => ShutdownSignal::Interrupt,
    };
    tokio::spawn(async move {
        let code = tokio::select! {
            _ = term.recv() => 128 + 15,
            _ = int.recv() => 128 + 2,
        };
        tracing::warn!("second signal during shutdown; exiting now");
        std::process::exit(code);
    });
    first
}
