//! The etcd source: list the prefix, then watch it.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{ConfigError, serde_duration};

/// `[etcd]` in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`http://host:2379`, `https://…`). A list, or one string
    /// with commas. Empty means standalone mode.
    #[serde(deserialize_with = "list_or_commas")]
    pub endpoints: Vec<String>,
    /// Key prefix under which edgeward's state lives.
    pub prefix: String,
    /// How long one connection attempt may take.
    #[serde(with = "serde_duration")]
    pub connect_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            prefix: "/edgeward/v1".to_owned(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl EtcdConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for endpoint in &self.endpoints {
            validate_endpoint(endpoint)?;
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(ConfigError::invalid(
                "etcd.prefix",
                &self.prefix,
                "must start with '/' and not end with '/', like /edgeward/v1",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "etcd.connect_timeout",
                "0s",
                "must be longer than zero",
            ));
        }
        Ok(())
    }
}

fn validate_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| {
            ConfigError::invalid(
                "etcd.endpoints",
                endpoint,
                "must be a URL starting with http:// or https://",
            )
        })?;
    let authority = rest.trim_end_matches('/');
    let port = authority.rsplit_once(':').map(|(_, p)| p);
    match port.map(str::parse::<u16>) {
        Some(Ok(p)) if p > 0 && !authority.contains('/') => Ok(()),
        _ => Err(ConfigError::invalid(
            "etcd.endpoints",
            endpoint,
            "must be scheme://host:port with a port from 1 to 65535",
        )),
    }
}

/// Accepts `["a", "b"]` or `"a,b"` (the form environment variables and flags give).
pub(crate) fn list_or_commas<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        String(String),
    }
    Ok(match ListOrString::deserialize(d)? {
        ListOrString::List(list) => list,
        ListOrString::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// Connects, lists the prefix and applies it; retries with backoff while etcd is unreachable.
/// Watching arrives with the full sync; for now the listed revision stays applied.
pub async fn run(
    config: EtcdConfig,
    status: crate::status::StatusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(config.connect_timeout)
                .with_timeout(config.connect_timeout);
            let mut client =
                etcd_client::Client::connect(config.endpoints.clone(), Some(options)).await?;
            let listed = client
                .get(
                    config.prefix.as_str(),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await?;
            Ok::<_, etcd_client::Error>(listed.header().map_or(0, |h| h.revision()))
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        match result {
            Ok(revision) => {
                tracing::info!(revision, prefix = %config.prefix, "configuration listed from etcd");
                status.config_applied(crate::status::ConfigSource::Etcd, revision);
                shutdown.cancelled().await;
                return;
            }
            Err(e) => {
                let message = format!("etcd {}: {e}", config.endpoints.join(","));
                tracing::warn!(error = %e, endpoints = ?config.endpoints, retry_in = ?delay, "etcd unreachable");
                status.update(|s| s.config.last_error = Some(message));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_scheme_and_port() {
        assert!(validate_endpoint("http://127.0.0.1:2379").is_ok());
        assert!(validate_endpoint("https://etcd.example:2379/").is_ok());
        assert!(validate_endpoint("127.0.0.1:2379").is_err());
        assert!(validate_endpoint("http://127.0.0.1").is_err());
        assert!(validate_endpoint("http://127.0.0.1:0").is_err());
        assert!(validate_endpoint("http://127.0.0.1:99999").is_err());
    }
}
