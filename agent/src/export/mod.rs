//! OpenTelemetry export of connection spans and metrics (OTLP over gRPC or HTTP).

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// `[otlp]` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// The collector's OTLP endpoint (`http://127.0.0.1:4317` for gRPC, `…:4318` for HTTP).
    /// Without it nothing is exported.
    pub endpoint: Option<String>,
    /// `grpc` or `http` (HTTP/protobuf).
    pub protocol: OtlpProtocol,
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

impl ExportConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "otlp.endpoint",
                endpoint,
                "must be a URL starting with http:// or https://",
            ));
        }
        Ok(())
    }
}
