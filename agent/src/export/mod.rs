//! OpenTelemetry export of connection spans and metrics (OTLP over gRPC or HTTP/protobuf).
//!
//! The pipeline hands each judged batch to [`ExportHandle::push_batch`], which turns close
//! events into spans ([`spans`]) and every event into metric updates ([`metrics`]); the encoded
//! OTLP requests wait in a bounded queue ([`queue`]) that drops the oldest when full, and one
//! sender task ([`exporter`]) ships them over the configured [`transport`], retrying
//! retryable failures with backoff. Settings come from `[otlp]`, overridden field by field by
//! the synced `node_config["export"]`, and change without a restart.
//!
//! Requests are built directly from `opentelemetry-proto` types rather than through the
//! OpenTelemetry SDK: the SDK's batch processor drops the newest span when full (this agent
//! must drop the oldest), its exporters are fixed when built (settings here change live), and a
//! connection already carries its start and end times, so the SDK's span lifecycle is work
//! without a purpose.

pub mod exporter;
pub mod metrics;
pub mod queue;
pub mod spans;
pub mod telemetry;
pub mod transport;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, serde_duration};

pub use exporter::{ExportHandle, Exporter};
pub use telemetry::ExportTelemetry;

/// `[otlp]` in the config file, and `export` in the synced node config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// The collector's OTLP endpoint (`http://127.0.0.1:4317` for gRPC, `…:4318` for HTTP;
    /// `https://` for TLS). Without it nothing is exported.
    pub endpoint: Option<String>,
    /// `grpc` or `http` (HTTP/protobuf).
    pub protocol: OtlpProtocol,
    /// `none` or `gzip`.
    pub compression: Compression,
    /// Extra request headers (gRPC metadata), e.g. an API key.
    pub headers: BTreeMap<String, String>,
    /// A file holding a bearer token, sent as `authorization: Bearer <token>`; re-read when it
    /// changes.
    pub bearer_token_file: Option<PathBuf>,
    /// TLS settings for `https://` endpoints.
    pub tls: TlsConfig,
    /// How long one export request may take.
    #[serde(with = "serde_duration")]
    pub timeout: Duration,
    /// Events per batch: a batch goes out when it has this many.
    pub batch_size: usize,
    /// ... or when its first event is this old.
    #[serde(with = "serde_duration")]
    pub batch_timeout: Duration,
    /// Capacity of the channel from the probe into the pipeline (events). Full = drop + count.
    /// Read at start; every other setting here also applies when changed through sync.
    pub channel_capacity: usize,
    /// Bound of the export queue, in bytes of encoded requests. When the collector is slow or
    /// down the queue fills, then drops its oldest requests (counted). The default, 8 MiB,
    /// holds ~32,000 spans (a few seconds at 10,000 connections/s) and keeps the whole agent
    /// within 50 MB; each MiB more costs about a MiB of RSS during an outage.
    pub queue_max_bytes: usize,
    /// First retry delay after a retryable failure; doubles up to `retry_max_backoff`. Each
    /// delay is drawn at random from the upper half of its window, so that agents that lost
    /// the same collector do not retry in step.
    #[serde(with = "serde_duration")]
    pub retry_initial_backoff: Duration,
    /// Longest retry delay.
    #[serde(with = "serde_duration")]
    pub retry_max_backoff: Duration,
    /// How often metrics are exported.
    #[serde(with = "serde_duration")]
    pub metrics_interval: Duration,
    /// Span attribute keys that become metric attributes (after plugin edits).
    pub metric_attributes: Vec<String>,
    /// Series per metric beyond which new attribute sets fold into one overflow series
    /// (`otel.metric.overflow = true`), counted in `edgeward.export.metric_overflow`.
    pub max_series: usize,
    /// Extra resource attributes (`deployment.environment`, `k8s.cluster.name`, …).
    pub resource: BTreeMap<String, String>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: OtlpProtocol::Grpc,
            compression: Compression::None,
            headers: BTreeMap::new(),
            bearer_token_file: None,
            tls: TlsConfig::default(),
            timeout: Duration::from_secs(10),
            batch_size: 512,
            batch_timeout: Duration::from_secs(1),
            channel_capacity: 16_384,
            queue_max_bytes: 8 << 20,
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(5),
            metrics_interval: Duration::from_secs(10),
            metric_attributes: vec![
                "network.peer.port".to_owned(),
                "process.executable.name".to_owned(),
            ],
            max_series: 1000,
            resource: BTreeMap::new(),
        }
    }
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    Http,
}

/// Request body compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Uncompressed.
    #[default]
    None,
    /// gzip.
    Gzip,
}

/// `[otlp.tls]`: files in PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// CA certificate(s) the collector's certificate must chain to. Required for `https://`
    /// endpoints (this agent does not read the system store).
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// Name to verify the collector's certificate against (default: the endpoint's host).
    pub server_name: Option<String>,
}

impl ExportConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    "otlp.endpoint",
                    endpoint,
                    "must be a URL starting with http:// or https://",
                ));
            }
            if let Err(e) = endpoint.parse::<http::Uri>() {
                return Err(ConfigError::invalid(
                    "otlp.endpoint",
                    endpoint,
                    e.to_string(),
                ));
            }
            if endpoint.starts_with("https://") && self.tls.ca_file.is_none() {
                return Err(ConfigError::invalid(
                    "otlp.tls.ca_file",
                    "(unset)",
                    "an https:// endpoint needs the CA that signed the collector's certificate",
                ));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::invalid(
                "otlp.tls.cert_file",
                format!("{:?}", self.tls.cert_file),
                "cert_file and key_file go together",
            ));
        }
        let positive = [
            ("otlp.batch_size", self.batch_size),
            ("otlp.channel_capacity", self.channel_capacity),
            ("otlp.max_series", self.max_series),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::invalid(key, v, "must be at least 1"));
            }
        }
        if self.queue_max_bytes < 64 << 10 {
            return Err(ConfigError::invalid(
                "otlp.queue_max_bytes",
                self.queue_max_bytes,
                "must be at least 65536 (one request must fit)",
            ));
        }
        let durations = [
            ("otlp.timeout", self.timeout),
            ("otlp.batch_timeout", self.batch_timeout),
            ("otlp.retry_initial_backoff", self.retry_initial_backoff),
            ("otlp.metrics_interval", self.metrics_interval),
        ];
        for (key, d) in durations {
            if d.is_zero() {
                return Err(ConfigError::invalid(key, "0s", "must be longer than zero"));
            }
        }
        if self.retry_max_backoff < self.retry_initial_backoff {
            return Err(ConfigError::invalid(
                "otlp.retry_max_backoff",
                humantime::format_duration(self.retry_max_backoff),
                "must not be shorter than retry_initial_backoff",
            ));
        }
        for key in self.headers.keys() {
            if http::HeaderName::from_bytes(key.as_bytes()).is_err() {
                return Err(ConfigError::invalid(
                    "otlp.headers",
                    key,
                    "not a valid header name",
                ));
            }
        }
        Ok(())
    }

    /// This config with `overrides` (the synced `node_config["export"]`) applied field by field
    /// (objects merge, anything else replaces), validated. Errors name the key as
    /// `export.<key>` and the value.
    pub fn with_overrides(&self, overrides: &serde_json::Value) -> Result<Self, ConfigError> {
        if overrides.is_null() {
            return Ok(self.clone());
        }
        if !overrides.is_object() {
            return Err(ConfigError::invalid(
                "export",
                overrides,
                "the synced export section must be a JSON object",
            ));
        }
        let mut base = serde_json::to_value(self).map_err(|e| {
            ConfigError::invalid("otlp", "(agent config)", format!("cannot serialize: {e}"))
        })?;
        merge(&mut base, overrides);
        let merged: ExportConfig =
            serde_json::from_value(base).map_err(|e| ConfigError::Parse {
                origin: "synced config key `export`".to_owned(),
                detail: e.to_string(),
            })?;
        merged.validate()?;
        Ok(merged)
    }
}

fn merge(base: &mut serde_json::Value, over: &serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Why export could not be set up or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A TLS or token file could not be read or parsed.
    #[error("otlp: {what} {path}: {reason}")]
    File {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The endpoint is unusable.
    #[error("otlp.endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The request could not be delivered (connection, TLS, timeout) or the collector
    /// answered with an error.
    #[error("export to {endpoint} failed: {reason}")]
    Send {
        /// The endpoint.
        endpoint: String,
        /// What went wrong, with the whole cause chain (TLS errors included).
        reason: String,
        /// Whether trying again later may succeed.
        retryable: bool,
    },
}

impl ExportError {
    /// Whether the failed request is worth retrying.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Send {
                retryable: true,
                ..
            }
        )
    }
}

/// An error and its sources, joined with `: `.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_merge_field_by_field_and_validate() {
        let base = ExportConfig {
            endpoint: Some("http://127.0.0.1:4317".into()),
            ..ExportConfig::default()
        };
        let merged = base
            .with_overrides(&serde_json::json!({"protocol": "http", "batch_size": 7,
                "resource": {"deployment.environment": "edge"}}))
            .unwrap();
        assert_eq!(merged.protocol, OtlpProtocol::Http);
        assert_eq!(merged.batch_size, 7);
        assert_eq!(merged.endpoint, base.endpoint);
        assert_eq!(merged.resource["deployment.environment"], "edge");

        let err = base
            .with_overrides(&serde_json::json!({"batch_sise": 7}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_sise"), "{err}");
        let err = base
            .with_overrides(&serde_json::json!({"endpoint": "ftp://x"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ftp://x"), "{err}");
        let err = base
            .with_overrides(&serde_json::json!({"batch_timeout": "soon"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
    }
}
