//! WASM policy plugins: manifests, the wasmtime host that runs them as an ordered chain, and
//! hot swap of that chain when desired state changes.
//!
//! - [`manifest`]: what an operator publishes (the contract with etcd).
//! - `engine`: one wasmtime [`Engine`](wasmtime::Engine) per process, the linker with the host
//!   imports, and the on-disk cache of compiled modules.
//! - `instance`: one plugin instance (its `Store`, limits, deadline, failure counting).
//! - `chain`: the ordered chain, seen by the pipeline as a
//!   [`BatchPolicy`](crate::pipeline::BatchPolicy).
//! - [`host`]: turns each [`DesiredState`](crate::sync::DesiredState) into a new chain, off the
//!   data path, and swaps it in only when every step succeeded.
//!
//! The plugin interface is the WIT package `edgeward:policy` in `plugins/wit/`; batches cross
//! it in the flat layout of the `edgeward-plugin-abi` crate.

mod chain;
pub(crate) mod engine;
mod fetch;
pub mod host;
mod instance;
pub mod manifest;
mod metrics;

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

pub use chain::Chain;
pub use engine::{INTERFACE, ModuleInfo, PluginRuntime};
pub use host::{PluginHost, SwapOutcome};
pub use instance::{BatchResult, PluginInstance};
pub use manifest::{
    Capability, FailurePolicy, ModuleLocation, NodeSelector, PluginLimits, PluginManifest,
};
pub use metrics::PluginMetrics;

use crate::config::serde_duration;

/// `[plugins]` in the agent's configuration: what operators allow plugins to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Upper bound on a manifest's `limits.batch_timeout`.
    #[serde(with = "serde_duration")]
    pub max_batch_timeout: Duration,
    /// Upper bound on a manifest's `limits.memory_mib`.
    pub max_memory_mib: u32,
    /// Capabilities beyond log/counter/clock that manifests may ask for. Empty: none.
    pub allowed_capabilities: Vec<Capability>,
    /// Where compiled modules are cached. Default: `<cache.dir>/modules`.
    pub module_cache_dir: Option<PathBuf>,
    /// Failed calls in a row after which a plugin is disabled until its manifest changes.
    pub max_consecutive_failures: u32,
    /// Time allowed to download a module from an https URL.
    #[serde(with = "serde_duration")]
    pub fetch_timeout: Duration,
    /// Largest module accepted, MiB.
    pub max_module_mib: u32,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            max_batch_timeout: Duration::from_millis(100),
            max_memory_mib: 256,
            allowed_capabilities: Vec::new(),
            module_cache_dir: None,
            max_consecutive_failures: 5,
            fetch_timeout: Duration::from_secs(30),
            max_module_mib: 64,
        }
    }
}

impl PluginsConfig {
    /// Checks values that have the right type but may still be wrong.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        use crate::config::ConfigError;
        if self.max_batch_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "plugins.max_batch_timeout",
                "0s",
                "must be longer than zero",
            ));
        }
        if self.max_memory_mib == 0 || self.max_memory_mib > 4096 {
            return Err(ConfigError::invalid(
                "plugins.max_memory_mib",
                self.max_memory_mib,
                "must be from 1 to 4096",
            ));
        }
        if self.max_consecutive_failures == 0 {
            return Err(ConfigError::invalid(
                "plugins.max_consecutive_failures",
                0,
                "must be 1 or more",
            ));
        }
        if self.max_module_mib == 0 {
            return Err(ConfigError::invalid(
                "plugins.max_module_mib",
                0,
                "must be 1 or more",
            ));
        }
        Ok(())
    }
}

/// Everything that can go wrong with a plugin, naming the plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The module bytes are not in the snapshot (etcd chunks missing).
    #[error("plugin {plugin}: module {sha256} is not in the snapshot (missing blob chunks)")]
    MissingModule {
        /// The plugin.
        plugin: String,
        /// The sha256 the manifest names.
        sha256: String,
    },
    /// Downloading the module failed.
    #[error("plugin {plugin}: fetching {url}: {reason}")]
    Fetch {
        /// The plugin.
        plugin: String,
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The module bytes do not hash to the manifest's sha256.
    #[error("plugin {plugin}: sha256 mismatch: manifest says {expected}, module is {actual}")]
    Sha256Mismatch {
        /// The plugin.
        plugin: String,
        /// From the manifest.
        expected: String,
        /// Of the bytes.
        actual: String,
    },
    /// Not a WebAssembly component (a core module, or not WebAssembly at all).
    #[error("plugin {plugin}: not a WebAssembly component: {reason}")]
    NotAComponent {
        /// The plugin.
        plugin: String,
        /// What it is instead.
        reason: String,
    },
    /// wasmtime could not compile the component.
    #[error("plugin {plugin}: compile: {reason}")]
    Compile {
        /// The plugin.
        plugin: String,
        /// wasmtime's message.
        reason: String,
    },
    /// The component does not target this host's interface version.
    #[error("plugin {plugin}: wrong interface: {reason}")]
    Interface {
        /// The plugin.
        plugin: String,
        /// What it exports or imports instead.
        reason: String,
    },
    /// The manifest asks for a capability the agent's configuration does not allow.
    #[error(
        "plugin {plugin}: capability {capability:?} is not allowed by this agent \
         (plugins.allowed_capabilities)"
    )]
    Capability {
        /// The plugin.
        plugin: String,
        /// The capability.
        capability: Capability,
    },
    /// `init` rejected the configuration.
    #[error("plugin {plugin}: init rejected its config: {message}")]
    InitRejected {
        /// The plugin.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// A call ran past its deadline.
    #[error("plugin {plugin}: {call} ran past its deadline of {limit:?}")]
    Timeout {
        /// The plugin.
        plugin: String,
        /// `init` or `on-batch`.
        call: &'static str,
        /// The deadline.
        limit: Duration,
    },
    /// The instance tried to grow its memory past the limit.
    #[error("plugin {plugin}: {call} hit the memory limit of {limit_mib} MiB")]
    MemoryLimit {
        /// The plugin.
        plugin: String,
        /// `init` or `on-batch`.
        call: &'static str,
        /// The limit.
        limit_mib: u32,
    },
    /// The instance overflowed its stack (runaway recursion).
    #[error("plugin {plugin}: {call} overflowed its stack")]
    StackOverflow {
        /// The plugin.
        plugin: String,
        /// `init` or `on-batch`.
        call: &'static str,
    },
    /// Any other trap (a panic, an unreachable, an out-of-bounds access).
    #[error("plugin {plugin}: {call} trapped: {reason}")]
    Trap {
        /// The plugin.
        plugin: String,
        /// `init` or `on-batch`.
        call: &'static str,
        /// wasmtime's description.
        reason: String,
    },
    /// The verdicts break the contract (wrong count, unknown code, edit out of range).
    #[error("plugin {plugin}: bad verdicts: {reason}")]
    BadVerdicts {
        /// The plugin.
        plugin: String,
        /// What is wrong.
        reason: String,
    },
    /// The plugin failed too often in a row and is disabled until its manifest changes.
    #[error("plugin {plugin}: disabled after {failures} failures in a row; last: {last}")]
    Disabled {
        /// The plugin.
        plugin: String,
        /// Failures in a row.
        failures: u32,
        /// The last error.
        last: String,
    },
}

impl PluginError {
    /// Whether trying again with nothing changed may succeed: a download that failed (the
    /// server or the network), or an `init` that ran out of time (its limit is wall-clock
    /// time, which a busy node can eat). Everything else is a property of the manifest or the
    /// module and waits for the next change.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Fetch { .. } | Self::Timeout { call: "init", .. }
        )
    }

    /// A short label for metrics (`kind` of `edgeward_plugin_errors_total`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MissingModule { .. } => "missing_module",
            Self::Fetch { .. } => "fetch",
            Self::Sha256Mismatch { .. } => "sha256_mismatch",
            Self::NotAComponent { .. } => "not_a_component",
            Self::Compile { .. } => "compile",
            Self::Interface { .. } => "interface",
            Self::Capability { .. } => "capability",
            Self::InitRejected { .. } => "init_rejected",
            Self::Timeout { .. } => "timeout",
            Self::MemoryLimit { .. } => "memory_limit",
            Self::StackOverflow { .. } => "stack_overflow",
            Self::Trap { .. } => "trap",
            Self::BadVerdicts { .. } => "bad_verdicts",
            Self::Disabled { .. } => "disabled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_may_pass_by_themselves_are_transient() {
        let plugin = || "p".to_owned();
        let timeout = |call| PluginError::Timeout {
            plugin: plugin(),
            call,
            limit: Duration::from_millis(10),
        };
        let fetch = PluginError::Fetch {
            plugin: plugin(),
            url: "https://modules.example/p.wasm".to_owned(),
            reason: "connection refused".to_owned(),
        };
        assert!(fetch.is_transient());
        assert!(timeout("init").is_transient());
        // The same deadline missed by every batch is the plugin's doing: its failure policy
        // handles it, not a retry of the change.
        assert!(!timeout("on-batch").is_transient());
        let mismatch = PluginError::Sha256Mismatch {
            plugin: plugin(),
            expected: "a".repeat(64),
            actual: "b".repeat(64),
        };
        let refused = PluginError::InitRejected {
            plugin: plugin(),
            message: "bad config".to_owned(),
        };
        assert!(!mismatch.is_transient() && !refused.is_transient());
    }

    #[test]
    fn plugins_section_rejects_bad_values_by_key() {
        let mut c = PluginsConfig::default();
        assert!(c.validate().is_ok());
        c.max_memory_mib = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("plugins.max_memory_mib"), "{e}");
        let c = PluginsConfig {
            max_batch_timeout: Duration::ZERO,
            ..PluginsConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("plugins.max_batch_timeout"), "{e}");
    }

    #[test]
    fn plugins_section_parses_from_toml() {
        let dir = tempfile_dir();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            "[plugins]\nmax_batch_timeout = \"20ms\"\nallowed_capabilities = [\"random\"]\n",
        )
        .unwrap();
        let config = crate::config::load_from(
            Some(&path),
            &serde_json::Value::Null,
            Vec::<(String, String)>::new(),
        )
        .unwrap();
        assert_eq!(config.plugins.max_batch_timeout, Duration::from_millis(20));
        assert_eq!(
            config.plugins.allowed_capabilities,
            vec![Capability::Random]
        );
        std::fs::write(&path, "[plugins]\nmax_memroy_mib = 1\n").unwrap();
        let e = crate::config::load_from(
            Some(&path),
            &serde_json::Value::Null,
            Vec::<(String, String)>::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_memroy_mib"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "edgeward-plugins-config-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
