//! The etcd source: list the prefix at a revision R, watch from R+1, resume from the last
//! applied revision after a disconnect, relist and apply the difference after a compaction.

use std::{path::PathBuf, time::Duration};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use serde::{Deserialize, Deserializer, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Applier, Change, Snapshot, SyncMetrics, snapshot::Entry};
use crate::{
    backoff::Backoff,
    config::{ConfigError, serde_duration},
    status::{ConfigSource, StatusHandle},
};

/// Largest gRPC message the agent accepts from etcd: a watch response carries a whole revision
/// (a published plugin's chunks arrive in one transaction), and a list page up to
/// [`LIST_PAGE`] values of up to 1.5 MiB each.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// Keys per list request.
const LIST_PAGE: i64 = 64;

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
    /// How long one request (a list page, a status write) may take.
    #[serde(with = "serde_duration")]
    pub request_timeout: Duration,
    /// Longest wait between reconnection attempts (the backoff grows to it, with jitter).
    #[serde(with = "serde_duration")]
    pub backoff_max: Duration,
    /// TTL of the lease under which this node's status key lives: it disappears this long
    /// after the node dies.
    #[serde(with = "serde_duration")]
    pub lease_ttl: Duration,
    /// TLS to etcd.
    pub tls: EtcdTlsConfig,
    /// User for etcd authentication (with `password_file`).
    pub username: Option<String>,
    /// File holding the password of `username` (trailing newline ignored).
    pub password_file: Option<PathBuf>,
}

/// `[etcd.tls]`: files in PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdTlsConfig {
    /// CA certificate(s) to verify etcd's server certificate. Needed for https endpoints.
    pub ca_file: Option<PathBuf>,
    /// Client certificate, for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    /// Key of the client certificate.
    pub key_file: Option<PathBuf>,
    /// Name to verify the server certificate against, when it differs from the endpoint host.
    pub server_name: Option<String>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            prefix: "/edgeward/v1".to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            backoff_max: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(30),
            tls: EtcdTlsConfig::default(),
            username: None,
            password_file: None,
        }
    }
}

/// Why talking to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A file named in the config could not be read.
    #[error("{key} {path}: {source}")]
    File {
        /// The config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The client failed.
    #[error("etcd {endpoints}: {source}")]
    Client {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        source: etcd_client::Error,
    },
    /// A request took longer than `etcd.request_timeout`.
    #[error("etcd {endpoints}: no answer within {timeout:?}")]
    Timeout {
        /// The endpoints tried.
        endpoints: String,
        /// The timeout.
        timeout: Duration,
    },
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
        for (key, d) in [
            ("etcd.connect_timeout", self.connect_timeout),
            ("etcd.request_timeout", self.request_timeout),
            ("etcd.backoff_max", self.backoff_max),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(key, "0s", "must be longer than zero"));
            }
        }
        if self.lease_ttl < Duration::from_secs(5) {
            return Err(ConfigError::invalid(
                "etcd.lease_ttl",
                humantime::format_duration(self.lease_ttl),
                "must be at least 5s",
            ));
        }
        if self.username.is_some() != self.password_file.is_some() {
            return Err(ConfigError::invalid(
                "etcd.username",
                self.username.as_deref().unwrap_or(""),
                "etcd.username and etcd.password_file go together",
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::invalid(
                "etcd.tls.cert_file",
                self.tls
                    .cert_file
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                "etcd.tls.cert_file and etcd.tls.key_file go together",
            ));
        }
        Ok(())
    }

    fn endpoints_label(&self) -> String {
        self.endpoints.join(",")
    }

    /// Connects to the cluster with the configured TLS, credentials and keep-alive.
    pub async fn connect(&self) -> Result<Client, EtcdError> {
        let read = |key: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|source| EtcdError::File {
                key,
                path: path.clone(),
                source,
            })
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            // etcd rejects pings more frequent than its --grpc-keepalive-min-time (5 s).
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(user), Some(file)) = (&self.username, &self.password_file) {
            let password = read("etcd.password_file", file)?;
            let password = String::from_utf8_lossy(&password).trim_end().to_owned();
            options = options
                .with_user(user.clone(), password)
                .with_auto_token_refresh(true);
        }
        let tls = &self.tls;
        if tls.ca_file.is_some() || tls.cert_file.is_some() {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &tls.ca_file {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(read(
                    "etcd.tls.ca_file",
                    ca,
                )?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                t = t.identity(etcd_client::Identity::from_pem(
                    read("etcd.tls.cert_file", cert)?,
                    read("etcd.tls.key_file", key)?,
                ));
            }
            if let Some(name) = &tls.server_name {
                t = t.domain_name(name.clone());
            }
            options = options.with_tls(t);
        }
        let connect = Client::connect(self.endpoints.clone(), Some(options));
        match tokio::time::timeout(self.connect_timeout * 2, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(source)) => Err(EtcdError::Client {
                endpoints: self.endpoints_label(),
                source,
            }),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: self.endpoints_label(),
                timeout: self.connect_timeout * 2,
            }),
        }
    }

    /// The key range the agent syncs: everything under the prefix before `status/` (config,
    /// plugins, blobs), so that nodes do not receive each other's status writes.
    pub fn sync_range(&self) -> (String, String) {
        (
            format!("{}/", self.prefix),
            format!("{}/status/", self.prefix),
        )
    }

    async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.request_timeout, f).await {
            Ok(r) => r.map_err(|source| EtcdError::Client {
                endpoints: self.endpoints_label(),
                source,
            }),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: self.endpoints_label(),
                timeout: self.request_timeout,
            }),
        }
    }

    /// Lists the sync range at one revision, page by page.
    pub async fn list(&self, client: &Client) -> Result<Snapshot, EtcdError> {
        let (start, end) = self.sync_range();
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let mut snapshot = Snapshot::default();
        let mut from = start.into_bytes();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if snapshot.revision > 0 {
                options = options.with_revision(snapshot.revision);
            }
            let page = self.timed(kv.get(from.clone(), Some(options))).await?;
            if snapshot.revision == 0 {
                snapshot.revision = page.header().map_or(0, |h| h.revision());
            }
            for kv in page.kvs() {
                snapshot.entries.insert(
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    Entry {
                        value: kv.value().into(),
                        mod_revision: kv.mod_revision(),
                    },
                );
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(snapshot)
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

/// Why a watch ended.
enum WatchEnd {
    Shutdown,
    /// The revision to resume from was compacted: relist.
    Compacted(i64),
    /// The connection or the stream failed: reconnect and resume.
    Failed(String),
}

/// Follows etcd until shutdown: list, watch, resume, relist; reconnects with backoff.
pub async fn run(
    config: EtcdConfig,
    mut applier: Applier,
    status: StatusHandle,
    metrics: SyncMetrics,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), config.backoff_max);
    let mut need_list = true;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session(&config, &mut applier, &mut need_list, &shutdown) => r,
        };
        let why = match result {
            WatchEnd::Shutdown => return,
            WatchEnd::Compacted(compacted) => {
                tracing::warn!(
                    resume_from = applier.revision() + 1,
                    compacted,
                    "watch revision compacted; relisting"
                );
                need_list = true;
                backoff.reset();
                continue;
            }
            WatchEnd::Failed(why) => why,
        };
        metrics.reconnects.inc();
        let delay = backoff.next_delay();
        tracing::warn!(error = %why, retry_in = ?delay, revision = applier.revision(), "etcd unavailable; serving the last applied state");
        status.update(|s| s.config.last_error = Some(why));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: list if needed, then watch until something ends it.
async fn session(
    config: &EtcdConfig,
    applier: &mut Applier,
    need_list: &mut bool,
    shutdown: &CancellationToken,
) -> WatchEnd {
    let client = match config.connect().await {
        Ok(c) => c,
        Err(e) => return WatchEnd::Failed(e.to_string()),
    };
    if *need_list {
        match config.list(&client).await {
            Ok(snapshot) => {
                tracing::info!(
                    revision = snapshot.revision,
                    keys = snapshot.entries.len(),
                    "listed etcd prefix"
                );
                applier.reset(snapshot, ConfigSource::Etcd);
                applier.metrics.relists.inc();
                *need_list = false;
            }
            Err(e) => return WatchEnd::Failed(e.to_string()),
        }
    }
    let (start, end) = config.sync_range();
    let from = applier.revision() + 1;
    let options = WatchOptions::new()
        .with_range(end)
        .with_start_revision(from)
        .with_progress_notify();
    let mut watch_client = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let mut stream = match config.timed(watch_client.watch(start, Some(options))).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Failed(e.to_string()),
    };
    tracing::debug!(from, "watching");
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return WatchEnd::Shutdown,
            m = stream.message() => m,
        };
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => return WatchEnd::Failed("watch stream closed by etcd".to_owned()),
            Err(e) => return WatchEnd::Failed(format!("watch: {e}")),
        };
        if response.compact_revision() > 0 {
            return WatchEnd::Compacted(response.compact_revision());
        }
        if response.canceled() {
            return WatchEnd::Failed(format!("watch canceled: {}", response.cancel_reason()));
        }
        if response.created() && response.events().is_empty() {
            // Connected and watching: whatever went wrong before is over.
            applier.status.update(|s| s.config.last_error = None);
            continue;
        }
        let header_revision = response.header().map_or(0, |h| h.revision());
        if response.events().is_empty() {
            applier.progress(header_revision);
            continue;
        }
        let mut revision = 0;
        let changes: Vec<Change> = response
            .events()
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                revision = revision.max(kv.mod_revision());
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                Some(match event.event_type() {
                    EventType::Put => Change::Put {
                        key,
                        value: kv.value().into(),
                        mod_revision: kv.mod_revision(),
                    },
                    EventType::Delete => Change::Delete {
                        key,
                        mod_revision: kv.mod_revision(),
                    },
                })
            })
            .collect();
        applier.apply(&changes, revision, ConfigSource::Etcd);
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

    #[test]
    fn sync_range_excludes_status() {
        let c = EtcdConfig::default();
        let (start, end) = c.sync_range();
        assert!(
            "/edgeward/v1/plugins/x" >= start.as_str() && "/edgeward/v1/plugins/x" < end.as_str()
        );
        assert!("/edgeward/v1/blobs/sha256/ab/0000" >= start.as_str());
        assert!("/edgeward/v1/status/node" >= end.as_str());
    }
}
