//! edgeward, a node agent for edge fleets.
//!
//! One process per node that syncs its configuration from etcd (or a local directory), keeps an
//! offline cache, loads WASM policy plugins, traces every TCP connection with eBPF and exports
//! the result through OpenTelemetry. The `edgeward` binary is a thin wrapper around
//! [`cli::main`]; every component is a module here with a config struct, a `build` step that
//! validates and allocates, and a task that runs until shutdown.
// `deny`, not `forbid`: the one exception is loading a compiled module from the plugin host's
// own compile cache (`plugins::engine::deserialize`), which wasmtime marks unsafe.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub(crate) mod backoff;
pub mod cli;
pub mod config;
pub mod export;
pub mod logging;
pub mod pipeline;
pub mod plugins;
pub mod probe;
pub mod runtime;
pub mod status;
pub mod sync;

/// The agent's version, as built.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
