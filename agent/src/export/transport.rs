//! Sending encoded OTLP requests: gRPC (tonic, sharing the tonic already in the tree) or
//! HTTP/protobuf (hyper HTTP/1.1), optionally gzip-compressed, over TLS by rustls with an
//! optional client certificate, with static headers and a bearer token read from a file.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::{Buf as _, BufMut as _, Bytes};
use http::{HeaderName, HeaderValue, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use tonic::{
    Status,
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{Compression, ExportConfig, ExportError, OtlpProtocol, error_chain, queue::Signal};

/// Headers sent with every request: the configured ones and the bearer token, whose file is
/// re-read when its modification time changes.
#[derive(Debug)]
struct Headers {
    fixed: Vec<(HeaderName, HeaderValue)>,
    token_file: Option<PathBuf>,
    token: Option<(SystemTime, HeaderValue)>,
}

impl Headers {
    fn new(config: &ExportConfig) -> Result<Self, ExportError> {
        let mut fixed = Vec::new();
        for (k, v) in &config.headers {
            let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).map_err(|e| {
                ExportError::Endpoint {
                    endpoint: format!("header {k:?}"),
                    reason: e.to_string(),
                }
            })?;
            let value = HeaderValue::from_str(v).map_err(|e| ExportError::Endpoint {
                endpoint: format!("header {k:?}"),
                reason: e.to_string(),
            })?;
            fixed.push((name, value));
        }
        let mut headers = Headers {
            fixed,
            token_file: config.bearer_token_file.clone(),
            token: None,
        };
        headers.refresh_token()?;
        Ok(headers)
    }

    /// Re-reads the token file if it changed since the last read.
    fn refresh_token(&mut self) -> Result<(), ExportError> {
        let Some(path) = &self.token_file else {
            return Ok(());
        };
        let err = |reason: String| ExportError::File {
            what: "bearer_token_file",
            path: path.clone(),
            reason,
        };
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_err(|e| err(e.to_string()))?;
        if self.token.as_ref().is_some_and(|(t, _)| *t == modified) {
            return Ok(());
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(err("the file is empty".to_owned()));
        }
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| err("the token has characters not allowed in a header".to_owned()))?;
        tracing::info!(path = %path.display(), "bearer token (re)loaded");
        self.token = Some((modified, value));
        Ok(())
    }

    fn all(&mut self) -> Result<Vec<(HeaderName, HeaderValue)>, ExportError> {
        self.refresh_token()?;
        let mut all = self.fixed.clone();
        if let Some((_, v)) = &self.token {
            all.push((http::header::AUTHORIZATION, v.clone()));
        }
        Ok(all)
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ExportError> {
    std::fs::read(path).map_err(|e| ExportError::File {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// A connected (or lazily connecting) OTLP client.
pub struct Transport {
    endpoint: String,
    timeout: Duration,
    gzip: bool,
    headers: Headers,
    kind: Kind,
}

enum Kind {
    Grpc(Channel),
    Http(HttpClient),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("endpoint", &self.endpoint)
            .field("grpc", &matches!(self.kind, Kind::Grpc(_)))
            .finish()
    }
}

impl Transport {
    /// Builds a client for `config` (whose endpoint must be set). Reads the TLS and token
    /// files now, so a bad file is reported at (re)configuration; connects lazily.
    pub fn build(config: &ExportConfig) -> Result<Transport, ExportError> {
        let endpoint = config
            .endpoint
            .clone()
            .ok_or_else(|| ExportError::Endpoint {
                endpoint: String::new(),
                reason: "no endpoint configured".to_owned(),
            })?;
        let uri: Uri =
            endpoint
                .parse()
                .map_err(|e: http::uri::InvalidUri| ExportError::Endpoint {
                    endpoint: endpoint.clone(),
                    reason: e.to_string(),
                })?;
        let tls = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or("localhost").to_owned();
        let server_name = config.tls.server_name.clone().unwrap_or(host);
        let headers = Headers::new(config)?;
        let kind = match config.protocol {
            OtlpProtocol::Grpc => {
                let mut ep = Endpoint::from_shared(endpoint.clone())
                    .map_err(|e| ExportError::Endpoint {
                        endpoint: endpoint.clone(),
                        reason: error_chain(&e),
                    })?
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout);
                if tls {
                    let mut tls_config = ClientTlsConfig::new().domain_name(server_name);
                    if let Some(ca) = &config.tls.ca_file {
                        tls_config = tls_config
                            .ca_certificate(Certificate::from_pem(read_file("tls.ca_file", ca)?));
                    }
                    if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
                        tls_config = tls_config.identity(Identity::from_pem(
                            read_file("tls.cert_file", cert)?,
                            read_file("tls.key_file", key)?,
                        ));
                    }
                    ep = ep
                        .tls_config(tls_config)
                        .map_err(|e| ExportError::Endpoint {
                            endpoint: endpoint.clone(),
                            reason: error_chain(&e),
                        })?;
                }
                Kind::Grpc(ep.connect_lazy())
            }
            OtlpProtocol::Http => Kind::Http(HttpClient::new(&uri, config, tls, server_name)?),
        };
        Ok(Transport {
            endpoint,
            timeout: config.timeout,
            gzip: config.compression == Compression::Gzip,
            headers,
            kind,
        })
    }

    /// The endpoint this client sends to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one encoded request.
    pub async fn send(&mut self, signal: Signal, body: Bytes) -> Result<(), ExportError> {
        let headers = self.headers.all()?;
        let result = tokio::time::timeout(self.timeout, async {
            match &mut self.kind {
                Kind::Grpc(channel) => {
                    send_grpc(
                        channel.clone(),
                        signal,
                        body,
                        headers,
                        self.gzip,
                        self.timeout,
                    )
                    .await
                }
                Kind::Http(client) => client.send(signal, body, headers, self.gzip).await,
            }
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err((reason, retryable))) => Err(ExportError::Send {
                endpoint: self.endpoint.clone(),
                reason,
                retryable,
            }),
            Err(_) => Err(ExportError::Send {
                endpoint: self.endpoint.clone(),
                reason: format!("no answer within {:?} (otlp.timeout)", self.timeout),
                retryable: true,
            }),
        }
    }
}

/// Passes already-encoded protobuf bytes through tonic unchanged, both ways.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

fn grpc_path(signal: Signal) -> http::uri::PathAndQuery {
    match signal {
        Signal::Traces => http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        ),
        Signal::Metrics => http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        ),
    }
}

/// gRPC codes worth retrying, per the OTLP specification.
fn grpc_retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled
            | DeadlineExceeded
            | Aborted
            | OutOfRange
            | Unavailable
            | DataLoss
            | ResourceExhausted
    )
}

async fn send_grpc(
    channel: Channel,
    signal: Signal,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
    gzip: bool,
    timeout: Duration,
) -> Result<(), (String, bool)> {
    let mut grpc = tonic::client::Grpc::new(channel);
    if gzip {
        grpc = grpc.send_compressed(CompressionEncoding::Gzip);
    }
    let status_err = |s: Status| {
        let retryable = grpc_retryable(s.code());
        let detail = if s.message().is_empty() {
            error_chain(&s)
        } else {
            s.message().to_owned()
        };
        (format!("gRPC {:?}: {detail}", s.code()), retryable)
    };
    grpc.ready().await.map_err(|e| (error_chain(&e), true))?;
    let mut request = tonic::Request::new(body);
    request.set_timeout(timeout);
    for (k, v) in headers {
        if let Ok(v) = tonic::metadata::MetadataValue::try_from(v.as_bytes()) {
            request.metadata_mut().insert(
                tonic::metadata::MetadataKey::from_bytes(k.as_str().as_bytes())
                    .map_err(|e| (format!("header {k}: {e}"), false))?,
                v,
            );
        }
    }
    grpc.unary(request, grpc_path(signal), RawCodec)
        .await
        .map(|_| ())
        .map_err(status_err)
}

/// OTLP/HTTP over one kept-alive HTTP/1.1 connection, reopened when it breaks.
struct HttpClient {
    authority: String,
    host: String,
    port: u16,
    base_path: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    fn new(
        uri: &Uri,
        config: &ExportConfig,
        tls: bool,
        server_name: String,
    ) -> Result<Self, ExportError> {
        let endpoint = config.endpoint.clone().unwrap_or_default();
        let bad = |reason: String| ExportError::Endpoint {
            endpoint: endpoint.clone(),
            reason,
        };
        let host = uri
            .host()
            .ok_or_else(|| bad("no host".to_owned()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| host.clone());
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let tls = if tls {
            let mut roots = rustls::RootCertStore::empty();
            if let Some(ca) = &config.tls.ca_file {
                let pem = read_file("tls.ca_file", ca)?;
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| ExportError::File {
                        what: "tls.ca_file",
                        path: ca.clone(),
                        reason: e.to_string(),
                    })?;
                    roots.add(cert).map_err(|e| ExportError::File {
                        what: "tls.ca_file",
                        path: ca.clone(),
                        reason: e.to_string(),
                    })?;
                }
            }
            let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots);
            let client = match (&config.tls.cert_file, &config.tls.key_file) {
                (Some(cert), Some(key)) => {
                    let file_err = |what, path: &PathBuf, e: String| ExportError::File {
                        what,
                        path: path.clone(),
                        reason: e,
                    };
                    let chain_pem = read_file("tls.cert_file", cert)?;
                    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(&chain_pem)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| file_err("tls.cert_file", cert, e.to_string()))?;
                    let key_pem = read_file("tls.key_file", key)?;
                    let key_der = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem)
                        .map_err(|e| file_err("tls.key_file", key, e.to_string()))?;
                    builder
                        .with_client_auth_cert(chain, key_der)
                        .map_err(|e| file_err("tls.cert_file", cert, e.to_string()))?
                }
                _ => builder.with_no_client_auth(),
            };
            let name = rustls::pki_types::ServerName::try_from(server_name.clone())
                .map_err(|e| bad(format!("server name {server_name:?}: {e}")))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(client)), name))
        } else {
            None
        };
        Ok(HttpClient {
            authority,
            host,
            port,
            base_path,
            tls,
            conn: None,
        })
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, (String, bool)> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| (format!("connecting to {}: {e}", self.authority), true))?;
        let _ = tcp.set_nodelay(true);
        macro_rules! handshake {
            ($io:expr) => {{
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new($io))
                    .await
                    .map_err(|e| (error_chain(&e), true))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "OTLP/HTTP connection closed");
                    }
                });
                sender
            }};
        }
        Ok(match &self.tls {
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), tcp).await.map_err(|e| {
                    (
                        format!("TLS handshake with {}: {}", self.authority, error_chain(&e)),
                        true,
                    )
                })?;
                handshake!(stream)
            }
            None => handshake!(tcp),
        })
    }

    async fn send(
        &mut self,
        signal: Signal,
        body: Bytes,
        headers: Vec<(HeaderName, HeaderValue)>,
        gzip: bool,
    ) -> Result<(), (String, bool)> {
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        sender.ready().await.map_err(|e| (error_chain(&e), true))?;
        let path = match signal {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
        };
        let body = if gzip {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::fast(),
            );
            std::io::Write::write_all(&mut enc, &body)
                .and_then(|_| enc.finish())
                .map(Bytes::from)
                .map_err(|e| (format!("gzip: {e}"), false))?
        } else {
            body
        };
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("{}{path}", self.base_path))
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf");
        if gzip {
            request = request.header(http::header::CONTENT_ENCODING, "gzip");
        }
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| (e.to_string(), false))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| (error_chain(&e), true))?;
        let status = response.status();
        let text = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        self.conn = Some(sender);
        if status.is_success() {
            return Ok(());
        }
        // Per the OTLP/HTTP specification: 429, 502, 503, 504 are retryable.
        let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504);
        let detail = String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
        Err((format!("HTTP {status}: {detail}"), retryable))
    }
}
