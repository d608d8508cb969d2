//! The agent's configuration: one TOML document whose keys can each be overridden by an
//! `EDGEWARD_*` environment variable and, for the common ones, by a command-line flag.
//!
//! Precedence, lowest first: built-in defaults, the file given by `--config`, the environment,
//! flags. Unknown keys are rejected wherever they come from, with the key and its source named,
//! so a typo never silently falls back to a default.
//!
//! Environment variables map onto keys by section: `EDGEWARD_ETCD_ENDPOINTS` is `etcd.endpoints`,
//! `EDGEWARD_ADMIN_ADDR` is `admin.addr`, `EDGEWARD_NODE_NAME` is `node_name`. List values take
//! commas (`EDGEWARD_ETCD_ENDPOINTS=http://a:2379,http://b:2379`).

mod duration;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    error::Kind,
    providers::{Format as _, Serialized, Toml},
    value::Value,
};
use serde::{Deserialize, Serialize};

use crate::{
    admin::AdminConfig,
    export::ExportConfig,
    logging::LogConfig,
    plugins::PluginsConfig,
    probe::ProbeConfig,
    sync::{CacheConfig, EtcdConfig, StandaloneConfig},
};

pub(crate) use duration::serde_duration;

/// Prefix of every environment variable that sets a configuration key.
pub const ENV_PREFIX: &str = "EDGEWARD_";

/// Environment variables with the prefix that are not configuration keys.
const ENV_NOT_KEYS: &[&str] = &["CONFIG"];

/// Top-level sections; `EDGEWARD_<SECTION>_<KEY>` maps to `<section>.<key>`.
const SECTIONS: &[&str] = &[
    "log",
    "etcd",
    "standalone",
    "cache",
    "admin",
    "otlp",
    "probe",
    "plugins",
];

/// Everything `edgeward run` needs to know, after defaults, file, environment and flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This node's name: the key of its overrides and status in etcd. Defaults to the
    /// `NODE_NAME` environment variable (Kubernetes Downward API), then the hostname.
    pub node_name: Option<String>,
    /// How long shutdown may take to flush and release before the agent gives up.
    #[serde(with = "serde_duration")]
    pub shutdown_timeout: Duration,
    /// Logging.
    pub log: LogConfig,
    /// The central etcd. Without endpoints the agent runs standalone.
    pub etcd: EtcdConfig,
    /// The local directory that replaces etcd in standalone mode.
    pub standalone: StandaloneConfig,
    /// The offline cache.
    pub cache: CacheConfig,
    /// The admin HTTP server.
    pub admin: AdminConfig,
    /// OpenTelemetry export.
    pub otlp: ExportConfig,
    /// The eBPF TCP probe.
    pub probe: ProbeConfig,
    /// WASM policy plugins: caps on their limits, allowed capabilities, compile cache.
    pub plugins: PluginsConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_name: None,
            shutdown_timeout: Duration::from_secs(10),
            log: LogConfig::default(),
            etcd: EtcdConfig::default(),
            standalone: StandaloneConfig::default(),
            cache: CacheConfig::default(),
            admin: AdminConfig::default(),
            otlp: ExportConfig::default(),
            probe: ProbeConfig::default(),
            plugins: PluginsConfig::default(),
        }
    }
}

/// Why a configuration could not be loaded. The message is one line, naming the key, the value
/// where there is one, and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key is unknown, has the wrong type, or the TOML does not parse.
    #[error("{origin}: {detail}")]
    Parse {
        /// Where the bad value came from (the file, an environment variable, a flag).
        origin: String,
        /// What is wrong, naming the key.
        detail: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("config key `{key}` = {value:?}: {reason}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// The value that was given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    /// Shorthand for [`ConfigError::Invalid`].
    pub fn invalid(key: &str, value: impl ToString, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Loads the configuration from an optional file, the process environment and flag overrides
/// (a tree of keys, as produced by the CLI), then validates it.
pub fn load(file: Option<&Path>, flags: &serde_json::Value) -> Result<AgentConfig, ConfigError> {
    load_from(file, flags, std::env::vars())
}

/// [`load`] with an explicit environment, for tests.
pub fn load_from(
    file: Option<&Path>,
    flags: &serde_json::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<AgentConfig, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(AgentConfig::default()));
    if let Some(path) = file {
        // Read it ourselves so a missing file is an I/O error naming the path, not an empty
        // document (figment treats a missing file as no data).
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // Check the file alone first so that errors name the file, not a merged view.
        Figment::from(Toml::string(&text))
            .extract::<AgentConfig>()
            .map_err(|e| parse_error(&format!("config file {}", path.display()), e))?;
        figment = figment.merge(Toml::string(&text));
    }

    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| {
            k.strip_prefix(ENV_PREFIX)
                .is_some_and(|rest| !ENV_NOT_KEYS.contains(&rest))
        })
        .collect();
    env.sort();
    for (name, raw) in &env {
        let key = env_key(&name[ENV_PREFIX.len()..]);
        // Each variable is checked on its own so that an error names exactly one of them.
        Figment::from(Serialized::defaults(AgentConfig::default()))
            .merge(env_value(&key, raw))
            .extract::<AgentConfig>()
            .map_err(|e| parse_error(&format!("environment variable {name}"), e))?;
        figment = figment.merge(env_value(&key, raw));
    }

    if flags.as_object().is_some_and(|m| !m.is_empty()) {
        figment = figment.merge(Serialized::defaults(flags));
    }
    let config: AgentConfig = figment
        .extract()
        .map_err(|e| parse_error("command-line flags", e))?;
    config.validate()?;
    Ok(config)
}

/// A value from the environment, typed the way TOML would read it (`true`, `42`, `"text"`).
fn env_value(key: &str, raw: &str) -> Serialized<Value> {
    let value: Value = raw.parse().unwrap_or_else(|never| match never {});
    Serialized::default(key, value)
}

/// Tables inside sections; `EDGEWARD_<SECTION>_<TABLE>_<KEY>` maps to
/// `<section>.<table>.<key>`.
const SUBTABLES: &[(&str, &str)] = &[("etcd", "tls"), ("otlp", "tls")];

/// `ETCD_ENDPOINTS` → `etcd.endpoints`; `OTLP_TLS_CA_FILE` → `otlp.tls.ca_file`;
/// `NODE_NAME` → `node_name`.
fn env_key(var: &str) -> String {
    let lower = var.to_ascii_lowercase();
    for section in SECTIONS {
        if let Some(rest) = lower
            .strip_prefix(section)
            .and_then(|r| r.strip_prefix('_'))
        {
            for (in_section, table) in SUBTABLES {
                if in_section == section
                    && let Some(key) = rest.strip_prefix(table).and_then(|r| r.strip_prefix('_'))
                {
                    return format!("{section}.{table}.{key}");
                }
            }
            return format!("{section}.{rest}");
        }
    }
    lower
}

fn parse_error(origin: &str, e: figment::Error) -> ConfigError {
    let mut path = e.path.clone();
    let detail = match &e.kind {
        Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            format!(
                "unknown key `{}`; expected one of: {}",
                path.join("."),
                expected.join(", ")
            )
        }
        kind if path.is_empty() => one_line(&kind.to_string()),
        kind => format!("key `{}`: {}", path.join("."), one_line(&kind.to_string())),
    };
    ConfigError::Parse {
        origin: origin.to_owned(),
        detail,
    }
}

/// Folds a multi-line parser message (TOML errors quote the offending line with a caret) into
/// one line: the quoted source is dropped, the rest joined.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| {
            let gutter = l
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start();
            !l.is_empty() && !gutter.starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

impl AgentConfig {
    /// Checks values that have the right type but may still be wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.node_name {
            validate_node_name(name)?;
        }
        if self.shutdown_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "shutdown_timeout",
                "0s",
                "must be longer than zero",
            ));
        }
        self.log.validate()?;
        self.etcd.validate()?;
        self.otlp.validate()?;
        self.probe.validate()?;
        self.plugins.validate()?;
        Ok(())
    }

    /// The node name to use: the configured one, else `NODE_NAME`, else the hostname.
    pub fn resolved_node_name(&self) -> Result<String, ConfigError> {
        if let Some(name) = &self.node_name {
            return Ok(name.clone());
        }
        if let Ok(name) = std::env::var("NODE_NAME")
            && !name.is_empty()
        {
            validate_node_name(&name)
                .map_err(|_| ConfigError::invalid("NODE_NAME", &name, NODE_NAME_RULE))?;
            return Ok(name);
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        validate_node_name(&host).map_err(|_| {
            ConfigError::invalid(
                "node_name",
                &host,
                "the hostname is not a usable node name; set --node-name",
            )
        })?;
        Ok(host)
    }
}

const NODE_NAME_RULE: &str =
    "a node name is 1 to 253 characters of a-z, A-Z, 0-9, '-', '_' and '.'";

fn validate_node_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid("node_name", name, NODE_NAME_RULE))
    }
}

#[cfg(test)]
mod tests;
