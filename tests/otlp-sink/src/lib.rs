//! A real OTLP receiver for edgeward's tests and demo.
//!
//! It serves OTLP/gRPC (the `opentelemetry-proto` tonic server stubs, optionally over TLS with
//! client-certificate verification) and OTLP/HTTP with protobuf bodies, accepts gzip on both,
//! and keeps what it received in memory so a test can wait for spans matching a predicate or
//! read metrics by name. It can answer slowly (a configurable delay) to play a collector under
//! load, and can be stopped and started again on the same ports to play one that goes away.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{Metric, metric},
    trace::v1::{Span, span::SpanKind, status::StatusCode as SpanStatusCode},
};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    codec::CompressionEncoding,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};

/// An attribute value, flattened for easy comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// Anything else (arrays, maps, bytes), as debug text.
    Other(String),
}

impl Value {
    fn from_any(v: Option<&AnyValue>) -> Value {
        match v.and_then(|v| v.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => Value::Str(s.clone()),
            Some(any_value::Value::IntValue(i)) => Value::Int(*i),
            Some(any_value::Value::DoubleValue(f)) => Value::Float(*f),
            Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
            other => Value::Other(format!("{other:?}")),
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Other(o) => write!(f, "{o}"),
        }
    }
}

/// Attributes by key.
pub type Attributes = BTreeMap<String, Value>;

fn attributes(kvs: &[KeyValue]) -> Attributes {
    kvs.iter()
        .map(|kv| (kv.key.clone(), Value::from_any(kv.value.as_ref())))
        .collect()
}

/// Which transport a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP (protobuf).
    Http,
}

/// One received span with its resource, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// The resource's attributes.
    pub resource: Attributes,
    /// The instrumentation scope's name.
    pub scope: String,
    /// The span's name.
    pub name: String,
    /// CLIENT, SERVER, ...
    pub kind: SpanKind,
    /// Start, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// End, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    /// Status code (UNSET, OK, ERROR).
    pub status: SpanStatusCode,
    /// Status message.
    pub status_message: String,
    /// Trace id (16 bytes).
    pub trace_id: Vec<u8>,
    /// Span id (8 bytes).
    pub span_id: Vec<u8>,
    /// The span's attributes.
    pub attributes: Attributes,
    /// The transport it arrived on.
    pub transport: Transport,
}

impl ReceivedSpan {
    fn new(resource: &Attributes, scope: &str, span: &Span, transport: Transport) -> Self {
        ReceivedSpan {
            resource: resource.clone(),
            scope: scope.to_owned(),
            name: span.name.clone(),
            kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
            start_unix_nanos: span.start_time_unix_nano,
            end_unix_nanos: span.end_time_unix_nano,
            status: span
                .status
                .as_ref()
                .and_then(|s| SpanStatusCode::try_from(s.code).ok())
                .unwrap_or(SpanStatusCode::Unset),
            status_message: span
                .status
                .as_ref()
                .map(|s| s.message.clone())
                .unwrap_or_default(),
            trace_id: span.trace_id.clone(),
            span_id: span.span_id.clone(),
            attributes: attributes(&span.attributes),
            transport,
        }
    }

    /// An attribute's value.
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes.get(key)
    }

    /// One readable line: kind, name, duration, status and attributes.
    pub fn to_line(&self) -> String {
        let dur = self.end_unix_nanos.saturating_sub(self.start_unix_nanos);
        let attrs: Vec<String> = self
            .attributes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "span {kind:?} {name:?} {dur:.3}ms status={status:?}{msg} {attrs}",
            kind = self.kind,
            name = self.name,
            dur = dur as f64 / 1e6,
            status = self.status,
            msg = if self.status_message.is_empty() {
                String::new()
            } else {
                format!("({})", self.status_message)
            },
            attrs = attrs.join(" "),
        )
    }
}

/// One data point of a received metric, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedPoint {
    /// The point's attributes.
    pub attributes: Attributes,
    /// Sum or gauge value (integers as f64); for histograms, the sum of observations.
    pub value: f64,
    /// For histograms: the number of observations; otherwise 0.
    pub count: u64,
    /// For histograms: bucket bounds.
    pub bounds: Vec<f64>,
    /// For histograms: bucket counts.
    pub bucket_counts: Vec<u64>,
}

/// One received metric (the points of one export request).
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedMetric {
    /// The resource's attributes.
    pub resource: Attributes,
    /// The metric's name.
    pub name: String,
    /// Its unit.
    pub unit: String,
    /// `sum`, `gauge` or `histogram` (or `other`).
    pub kind: &'static str,
    /// For sums: whether monotonic.
    pub monotonic: bool,
    /// Its points.
    pub points: Vec<ReceivedPoint>,
    /// The transport it arrived on.
    pub transport: Transport,
}

impl ReceivedMetric {
    fn new(resource: &Attributes, m: &Metric, transport: Transport) -> Self {
        let mut monotonic = false;
        let (kind, points) = match &m.data {
            Some(metric::Data::Sum(s)) => {
                monotonic = s.is_monotonic;
                ("sum", s.data_points.iter().map(number_point).collect())
            }
            Some(metric::Data::Gauge(g)) => {
                ("gauge", g.data_points.iter().map(number_point).collect())
            }
            Some(metric::Data::Histogram(h)) => (
                "histogram",
                h.data_points
                    .iter()
                    .map(|p| ReceivedPoint {
                        attributes: attributes(&p.attributes),
                        value: p.sum.unwrap_or(0.0),
                        count: p.count,
                        bounds: p.explicit_bounds.clone(),
                        bucket_counts: p.bucket_counts.clone(),
                    })
                    .collect(),
            ),
            _ => ("other", Vec::new()),
        };
        ReceivedMetric {
            resource: resource.clone(),
            name: m.name.clone(),
            unit: m.unit.clone(),
            kind,
            monotonic,
            points,
            transport,
        }
    }

    /// The point whose attributes include all of `attrs`.
    pub fn point(&self, attrs: &[(&str, Value)]) -> Option<&ReceivedPoint> {
        self.points.iter().find(|p| {
            attrs
                .iter()
                .all(|(k, v)| p.attributes.get(*k).is_some_and(|pv| pv == v))
        })
    }

    /// The sum of the values of all points.
    pub fn total(&self) -> f64 {
        self.points.iter().map(|p| p.value).sum()
    }

    /// Readable lines: one per point.
    pub fn to_lines(&self) -> Vec<String> {
        self.points
            .iter()
            .map(|p| {
                let attrs: Vec<String> = p
                    .attributes
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                if self.kind == "histogram" {
                    format!(
                        "metric {} ({}) count={} sum={} {{{}}}",
                        self.name,
                        self.unit,
                        p.count,
                        p.value,
                        attrs.join(", ")
                    )
                } else {
                    format!(
                        "metric {} ({}) {}={} {{{}}}",
                        self.name,
                        self.unit,
                        self.kind,
                        p.value,
                        attrs.join(", ")
                    )
                }
            })
            .collect()
    }
}

fn number_point(p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint) -> ReceivedPoint {
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as V;
    ReceivedPoint {
        attributes: attributes(&p.attributes),
        value: match p.value {
            Some(V::AsInt(i)) => i as f64,
            Some(V::AsDouble(d)) => d,
            None => 0.0,
        },
        count: 0,
        bounds: Vec::new(),
        bucket_counts: Vec::new(),
    }
}

/// Server-side TLS: the sink's certificate and, optionally, the CA that client certificates
/// must chain to (mutual TLS).
#[derive(Debug, Clone)]
pub struct SinkTls {
    /// PEM certificate chain of the server.
    pub cert_pem: String,
    /// PEM private key of the server.
    pub key_pem: String,
    /// PEM CA for client certificates; when set, clients must present one.
    pub client_ca_pem: Option<String>,
}

/// How to start a sink.
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// gRPC listen address (default: a free loopback port).
    pub grpc_addr: Option<SocketAddr>,
    /// HTTP listen address (default: a free loopback port).
    pub http_addr: Option<SocketAddr>,
    /// TLS for both listeners.
    pub tls: Option<SinkTls>,
    /// Answer every request after this long.
    pub delay: Duration,
    /// Print what arrives to stdout, one readable line per span / metric point.
    pub print: bool,
    /// Count what arrives but keep nothing (for long benchmark runs).
    pub discard: bool,
}

/// How the sink answers the requests it is told to fail (see [`Sink::fail_next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// gRPC UNAVAILABLE / HTTP 503: the client should retry.
    Retryable,
    /// gRPC INVALID_ARGUMENT / HTTP 400: the client should not.
    Permanent,
}

/// What the sink has received, shared by its handlers.
#[derive(Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    metrics: Vec<ReceivedMetric>,
    span_total: u64,
    failed_requests: u64,
    trace_requests: u64,
    metric_requests: u64,
    gzip_requests: u64,
    headers: Vec<BTreeMap<String, String>>,
}

struct Shared {
    received: Mutex<Received>,
    changed: tokio::sync::Notify,
    delay_ms: std::sync::atomic::AtomicU64,
    print: bool,
    discard: bool,
    fail: Mutex<(u64, Failure)>,
}

impl Shared {
    /// Whether to fail this request, and how.
    fn failure(&self) -> Option<Failure> {
        let mut f = self.fail.lock().unwrap_or_else(|p| p.into_inner());
        if f.0 == 0 {
            return None;
        }
        f.0 -= 1;
        self.lock().failed_requests += 1;
        Some(f.1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn delay(&self) {
        let ms = self.delay_ms.load(std::sync::atomic::Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    fn take_traces(
        &self,
        req: ExportTraceServiceRequest,
        transport: Transport,
        headers: BTreeMap<String, String>,
    ) {
        let mut spans = Vec::new();
        for rs in &req.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                let scope = ss.scope.as_ref().map(|s| s.name.as_str()).unwrap_or("");
                for span in &ss.spans {
                    spans.push(ReceivedSpan::new(&resource, scope, span, transport));
                }
            }
        }
        if self.print {
            for s in &spans {
                println!("{}", s.to_line());
            }
        }
        let mut r = self.lock();
        r.trace_requests += 1;
        r.span_total += spans.len() as u64;
        if !self.discard {
            r.headers.push(headers);
            r.spans.extend(spans);
        }
        drop(r);
        self.changed.notify_waiters();
    }

    fn take_metrics(
        &self,
        req: ExportMetricsServiceRequest,
        transport: Transport,
        headers: BTreeMap<String, String>,
    ) {
        let mut metrics = Vec::new();
        for rm in &req.resource_metrics {
            let resource = rm
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    metrics.push(ReceivedMetric::new(&resource, m, transport));
                }
            }
        }
        if self.print {
            for m in &metrics {
                for line in m.to_lines() {
                    println!("{line}");
                }
            }
        }
        let mut r = self.lock();
        r.metric_requests += 1;
        if !self.discard {
            r.headers.push(headers);
            r.metrics.extend(metrics);
        }
        drop(r);
        self.changed.notify_waiters();
    }
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

struct Grpc(Arc<Shared>);

impl Grpc {
    /// What both gRPC services do first: the configured delay, an injected failure, and the
    /// request's headers (counting gzip-encoded requests).
    async fn prelude<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<BTreeMap<String, String>, tonic::Status> {
        self.0.delay().await;
        match self.0.failure() {
            Some(Failure::Retryable) => {
                return Err(tonic::Status::unavailable("sink told to fail"));
            }
            Some(Failure::Permanent) => {
                return Err(tonic::Status::invalid_argument("sink told to reject"));
            }
            None => {}
        }
        let headers = header_map(&request.metadata().clone().into_headers());
        if headers.get("grpc-encoding").is_some_and(|e| e == "gzip") {
            self.0.lock().gzip_requests += 1;
        }
        Ok(headers)
    }
}

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = self.prelude(&request).await?;
        self.0
            .take_traces(request.into_inner(), Transport::Grpc, headers);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let headers = self.prelude(&request).await?;
        self.0
            .take_metrics(request.into_inner(), Transport::Grpc, headers);
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn http_body(
    shared: &Shared,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Vec<u8>, (StatusCode, String)> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != "application/x-protobuf" {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-type {ct:?}: only application/x-protobuf"),
        ));
    }
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() == b"gzip");
    if gzip {
        shared.lock().gzip_requests += 1;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("gzip: {e}")))?;
        Ok(out)
    } else {
        Ok(body.to_vec())
    }
}

fn protobuf_response(msg: impl prost::Message) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        msg.encode_to_vec(),
    )
        .into_response()
}

/// What both OTLP/HTTP handlers do first: the configured delay, the configured failure, then
/// the (possibly gzipped) body.
async fn accept_http(
    shared: &Shared,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Vec<u8>, Response> {
    shared.delay().await;
    match shared.failure() {
        Some(Failure::Retryable) => {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "sink told to fail").into_response());
        }
        Some(Failure::Permanent) => {
            return Err((StatusCode::BAD_REQUEST, "sink told to reject").into_response());
        }
        None => {}
    }
    http_body(shared, headers, body).map_err(IntoResponse::into_response)
}

async fn http_traces(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bytes = match accept_http(&shared, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match ExportTraceServiceRequest::decode(&bytes[..]) {
        Ok(req) => {
            shared.take_traces(req, Transport::Http, header_map(&headers));
            protobuf_response(ExportTraceServiceResponse {
                partial_success: None,
            })
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("protobuf: {e}")).into_response(),
    }
}

async fn http_metrics(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bytes = match accept_http(&shared, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match ExportMetricsServiceRequest::decode(&bytes[..]) {
        Ok(req) => {
            shared.take_metrics(req, Transport::Http, header_map(&headers));
            protobuf_response(ExportMetricsServiceResponse {
                partial_success: None,
            })
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("protobuf: {e}")).into_response(),
    }
}

/// A running OTLP receiver. Stops when dropped or [`Sink::stop`]ped.
pub struct Sink {
    shared: Arc<Shared>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    tls: bool,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sink {
    /// Starts a sink with default options: plaintext, free loopback ports, no delay.
    pub async fn start() -> anyhow::Result<Sink> {
        Sink::start_with(SinkOptions::default()).await
    }

    /// Starts a sink: binds both listeners (so the ports are taken when this returns) and
    /// serves them on the current tokio runtime.
    pub async fn start_with(options: SinkOptions) -> anyhow::Result<Sink> {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let grpc_listener = TcpListener::bind(options.grpc_addr.unwrap_or(loopback))
            .await
            .map_err(|e| anyhow::anyhow!("otlp sink: binding gRPC {:?}: {e}", options.grpc_addr))?;
        let http_listener = TcpListener::bind(options.http_addr.unwrap_or(loopback))
            .await
            .map_err(|e| anyhow::anyhow!("otlp sink: binding HTTP {:?}: {e}", options.http_addr))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let shared = Arc::new(Shared {
            received: Mutex::new(Received::default()),
            changed: tokio::sync::Notify::new(),
            delay_ms: std::sync::atomic::AtomicU64::new(options.delay.as_millis() as u64),
            print: options.print,
            discard: options.discard,
            fail: Mutex::new((0, Failure::Retryable)),
        });
        let shutdown = CancellationToken::new();

        let mut server = Server::builder();
        if let Some(tls) = &options.tls {
            let mut config =
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
            if let Some(ca) = &tls.client_ca_pem {
                config = config.client_ca_root(Certificate::from_pem(ca));
            }
            server = server.tls_config(config)?;
        }
        let router = server
            .add_service(
                TraceServiceServer::new(Grpc(shared.clone()))
                    .accept_compressed(CompressionEncoding::Gzip),
            )
            .add_service(
                MetricsServiceServer::new(Grpc(shared.clone()))
                    .accept_compressed(CompressionEncoding::Gzip),
            );
        let incoming = tokio_stream_listener(grpc_listener);
        let stop = shutdown.clone();
        let grpc_task = tokio::spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                eprintln!("otlp sink: gRPC server: {e}");
            }
        });

        let app = Router::new()
            .route("/v1/traces", post(http_traces))
            .route("/v1/metrics", post(http_metrics))
            .with_state(shared.clone());
        let stop = shutdown.clone();
        let http_task = match &options.tls {
            None => tokio::spawn(async move {
                if let Err(e) = axum::serve(http_listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    eprintln!("otlp sink: HTTP server: {e}");
                }
            }),
            Some(tls) => {
                let acceptor = tls_acceptor(tls)?;
                tokio::spawn(serve_https(http_listener, acceptor, app, stop))
            }
        };

        Ok(Sink {
            shared,
            grpc_addr,
            http_addr,
            tls: options.tls.is_some(),
            shutdown,
            tasks: vec![grpc_task, http_task],
        })
    }

    /// The gRPC endpoint URL (`http://…` or `https://…` with TLS).
    pub fn grpc_endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc_addr)
    }

    /// The HTTP endpoint URL (`http://…` or `https://…` with TLS; the exporter appends
    /// `/v1/traces`, `/v1/metrics`).
    pub fn http_endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr)
    }

    /// The gRPC listen address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The HTTP listen address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Changes how long the sink waits before answering.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Fails the next `n` requests (either signal, either transport) the way `how` says.
    pub fn fail_next(&self, n: u64, how: Failure) {
        *self.shared.fail.lock().unwrap_or_else(|p| p.into_inner()) = (n, how);
    }

    /// How many requests were failed on purpose.
    pub fn failed_requests(&self) -> u64 {
        self.shared.lock().failed_requests
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.lock().spans.clone()
    }

    /// How many spans are kept (all that arrived, unless `discard`).
    pub fn span_count(&self) -> usize {
        self.shared.lock().spans.len()
    }

    /// How many spans have arrived in all, kept or not.
    pub fn span_total(&self) -> u64 {
        self.shared.lock().span_total
    }

    /// Every metric received so far, in arrival order (each export request adds its own).
    pub fn metrics(&self) -> Vec<ReceivedMetric> {
        self.shared.lock().metrics.clone()
    }

    /// The metrics named `name`, in arrival order.
    pub fn metrics_named(&self, name: &str) -> Vec<ReceivedMetric> {
        self.shared
            .lock()
            .metrics
            .iter()
            .filter(|m| m.name == name)
            .cloned()
            .collect()
    }

    /// The most recent metric named `name` (metrics are cumulative: the latest is the total).
    pub fn latest_metric(&self, name: &str) -> Option<ReceivedMetric> {
        self.shared
            .lock()
            .metrics
            .iter()
            .rev()
            .find(|m| m.name == name)
            .cloned()
    }

    /// Request counts: (trace requests, metric requests, gzip-encoded requests).
    pub fn request_counts(&self) -> (u64, u64, u64) {
        let r = self.shared.lock();
        (r.trace_requests, r.metric_requests, r.gzip_requests)
    }

    /// The headers (or gRPC metadata) of every request, in arrival order.
    pub fn request_headers(&self) -> Vec<BTreeMap<String, String>> {
        self.shared.lock().headers.clone()
    }

    /// Waits until at least `n` received spans satisfy `pred`, and returns those spans; fails
    /// after `timeout` saying how many matched.
    pub async fn wait_for_spans(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&ReceivedSpan) -> bool,
    ) -> anyhow::Result<Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            let matching: Vec<ReceivedSpan> = self
                .shared
                .lock()
                .spans
                .iter()
                .filter(|s| pred(s))
                .cloned()
                .collect();
            if matching.len() >= n {
                return Ok(matching);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!(
                    "otlp sink: {} of {n} expected spans after {timeout:?} ({} spans received in all)",
                    matching.len(),
                    self.span_count()
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Waits until a metric named `name` satisfying `pred` has arrived, and returns it.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&ReceivedMetric) -> bool,
    ) -> anyhow::Result<ReceivedMetric> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if let Some(m) = self
                .shared
                .lock()
                .metrics
                .iter()
                .rev()
                .find(|m| m.name == name && pred(m))
            {
                return Ok(m.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!(
                    "otlp sink: no metric {name:?} matching after {timeout:?}; latest: {:?}",
                    self.latest_metric(name)
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Stops both listeners and waits for them to close (ports are free afterwards).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn tls_acceptor(tls: &SinkTls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain =
        CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(cert?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// OTLP/HTTP over TLS: one task per connection, each a TLS handshake then HTTP/1.1.
async fn serve_https(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    stop: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("otlp sink: HTTPS accept: {e}");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // A failed handshake (untrusted client, wrong CA) just ends this connection.
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Accepted connections of a bound listener as the stream tonic serves.
fn tokio_stream_listener(
    listener: TcpListener,
) -> impl tokio_stream_shim::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream_shim::accept_stream(listener)
}

mod tokio_stream_shim {
    //! A tiny stream over `TcpListener::accept`, so the sink needs no extra crate.
    pub use futures_core::Stream;
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };
    use tokio::net::{TcpListener, TcpStream};

    pub struct Accept(TcpListener);

    impl Stream for Accept {
        type Item = std::io::Result<TcpStream>;
        fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.0.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => {
                    // Answer without waiting for Nagle + delayed ACK, like any real collector.
                    let _ = stream.set_nodelay(true);
                    Poll::Ready(Some(Ok(stream)))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    pub fn accept_stream(listener: TcpListener) -> Accept {
        Accept(listener)
    }
}
