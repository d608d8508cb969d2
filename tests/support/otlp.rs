//! Helpers for export tests: the in-process pipeline + exporter fed with recorded connection
//! events, test certificates, and re-exports of the OTLP sink.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::Duration,
};

use edgeward::{
    export::{ExportConfig, ExportHandle, ExportTelemetry, Exporter, spans::NodeIdentity},
    pipeline::{self, BatchPolicy, PipelineInput},
    probe::event::{
        AttrEdit, AttrValue, CloseReason, ConnectionEvent, Direction, EventKind, SmolStr,
    },
    status::{ConfigSource, StatusHandle},
    sync::DesiredState,
};
#[allow(unused_imports)] // each test binary uses a different part
pub use edgeward_otlp_sink::{Sink, SinkOptions, SinkTls};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The in-process pipeline and exporter, as the agent wires them.
pub struct Harness {
    /// Where the "probe" sends events.
    pub input: PipelineInput,
    /// The exporter's pipeline side.
    pub handle: ExportHandle,
    /// The status document.
    pub status: StatusHandle,
    /// Self-metrics.
    pub telemetry: ExportTelemetry,
    /// Synced state, to change export settings live.
    pub desired: watch::Sender<Arc<DesiredState>>,
    /// The plugin chain.
    pub policy: watch::Sender<Arc<dyn BatchPolicy>>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Harness {
    /// Starts pipeline and exporter on the current runtime.
    pub fn start(config: ExportConfig) -> Harness {
        let status = StatusHandle::new("test-node");
        let telemetry = ExportTelemetry::default();
        let (desired, desired_rx) =
            watch::channel(Arc::new(DesiredState::empty(ConfigSource::File)));
        let (policy, policy_rx) =
            watch::channel::<Arc<dyn BatchPolicy>>(Arc::new(pipeline::KeepAll));
        let (exporter, handle) = Exporter::build(
            &config,
            NodeIdentity {
                host_name: "test-host".to_owned(),
                k8s_node_name: Some("test-node".to_owned()),
            },
            status.clone(),
            telemetry.clone(),
            Some(desired_rx),
        );
        let (input, rx) = pipeline::channel(config.channel_capacity, telemetry.clone());
        let shutdown = CancellationToken::new();
        let done = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(pipeline::run(
                rx,
                policy_rx,
                handle.clone(),
                shutdown.clone(),
                done.clone(),
            )),
            tokio::spawn(exporter.run(done, Duration::from_secs(5))),
        ];
        Harness {
            input,
            handle,
            status,
            telemetry,
            desired,
            policy,
            shutdown,
            tasks,
        }
    }

    /// Sends every event; panics if the pipeline channel refused one.
    pub fn send_all(&self, events: impl IntoIterator<Item = ConnectionEvent>) {
        for ev in events {
            assert!(self.input.send(ev), "pipeline channel full");
        }
    }

    /// Publishes a new synced `export` section.
    pub fn sync_export(&self, section: serde_json::Value) {
        let mut state = DesiredState::empty(ConfigSource::Etcd);
        state.revision = 2;
        state.node_config = serde_json::json!({ "export": section });
        self.desired.send_replace(Arc::new(state));
    }

    /// Cancels, lets the pipeline drain and the exporter flush, and waits for both.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            t.await.expect("pipeline/exporter task panicked");
        }
    }
}

/// An export config for tests: `endpoint`, short batching and metric intervals.
pub fn test_config(endpoint: &str, protocol: edgeward::export::OtlpProtocol) -> ExportConfig {
    ExportConfig {
        endpoint: Some(endpoint.to_owned()),
        protocol,
        batch_size: 64,
        batch_timeout: Duration::from_millis(50),
        metrics_interval: Duration::from_millis(200),
        retry_initial_backoff: Duration::from_millis(50),
        retry_max_backoff: Duration::from_millis(200),
        timeout: Duration::from_secs(2),
        ..ExportConfig::default()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A recorded connection event: `kind` of a connection from 10.1.0.1 to `peer`.
pub fn event(kind: EventKind, direction: Direction, peer: &str) -> ConnectionEvent {
    let start = 1_700_000_000_000_000_000u64;
    ConnectionEvent {
        kind,
        conn_id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        direction,
        local: "10.1.0.1:41000".parse().unwrap(),
        peer: peer.parse::<SocketAddr>().unwrap(),
        pid: 4242,
        tgid: 4240,
        comm: SmolStr::new("curl"),
        cgroup_id: 77,
        netns: 4026531840,
        start_unix_nanos: start,
        end_unix_nanos: if kind == EventKind::Open {
            0
        } else {
            start + 2_500_000
        },
        bytes_sent: 100,
        bytes_received: 2000,
        srtt_us: 800,
        rttvar_us: 100,
        retransmits: if kind == EventKind::Close { 1 } else { 0 },
        close_reason: if kind == EventKind::Close {
            CloseReason::Normal
        } else {
            CloseReason::Open
        },
        started_before_probe: false,
        executable: Some(SmolStr::new("curl")),
        container_id: Some(Arc::from("c0ffee")),
        pod_uid: None,
        edits: Vec::new(),
    }
}

/// A close event with a given connection id (for finding it at the sink).
pub fn close_with_id(id: u64) -> ConnectionEvent {
    let mut ev = event(EventKind::Close, Direction::Active, "10.2.0.9:8080");
    ev.conn_id = id;
    ev.local.set_port((id % 60000) as u16 + 1024);
    ev
}

/// A policy like a small plugin: drops connections to port 22, tags the rest with
/// `policy.checked = true` and redacts `container.id`.
pub struct TagAndDrop;

impl BatchPolicy for TagAndDrop {
    fn apply(&self, batch: &mut Vec<ConnectionEvent>) {
        batch.retain(|ev| ev.peer.port() != 22);
        for ev in batch {
            ev.edits.push(AttrEdit::Set(
                Arc::from("policy.checked"),
                AttrValue::Bool(true),
            ));
            ev.edits.push(AttrEdit::Remove(Arc::from("container.id")));
        }
    }
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, in PEM files.
pub struct TestPki {
    dir: tempfile::TempDir,
    /// The CA certificate.
    pub ca_pem: String,
    /// Server certificate and key.
    pub server_cert_pem: String,
    /// Server key.
    pub server_key_pem: String,
}

impl TestPki {
    /// Generates a fresh PKI.
    pub fn generate() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!(
                "edgeward test CA {}",
                std::process::id() as u64 * 1000 + NEXT_ID.fetch_add(1, Ordering::Relaxed)
            ),
        );
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);

        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["edgeward-agent".to_owned()]).unwrap();
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edgeward-agent");
        let client = client_params.signed_by(&client_key, &issuer).unwrap();

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("client.pem"), client.pem()).unwrap();
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();
        TestPki {
            dir,
            ca_pem: ca.pem(),
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
        }
    }

    /// Path of the CA certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Path of the client certificate file.
    pub fn client_cert_file(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    /// Path of the client key file.
    pub fn client_key_file(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// Sink TLS: this server certificate, requiring client certificates from this CA.
    pub fn sink_tls(&self) -> SinkTls {
        SinkTls {
            cert_pem: self.server_cert_pem.clone(),
            key_pem: self.server_key_pem.clone(),
            client_ca_pem: Some(self.ca_pem.clone()),
        }
    }
}

/// A sink with its own runtime, for tests that are not async (like the end-to-end tests that
/// drive the `edgeward` binary with blocking helpers).
pub struct BlockingSink {
    /// The sink; its read-only accessors (`spans`, `latest_metric`, endpoints) work as is.
    pub sink: Option<Sink>,
    runtime: tokio::runtime::Runtime,
}

impl BlockingSink {
    /// Starts a sink on free loopback ports.
    pub fn start(options: SinkOptions) -> BlockingSink {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("sink runtime");
        let sink = runtime
            .block_on(Sink::start_with(options))
            .expect("starting the OTLP sink");
        BlockingSink {
            sink: Some(sink),
            runtime,
        }
    }

    /// The running sink.
    pub fn get(&self) -> &Sink {
        self.sink.as_ref().expect("sink running")
    }

    /// [`Sink::wait_for_spans`], blocking; panics with the sink's message on timeout.
    pub fn wait_for_spans(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&edgeward_otlp_sink::ReceivedSpan) -> bool,
    ) -> Vec<edgeward_otlp_sink::ReceivedSpan> {
        self.runtime
            .block_on(self.get().wait_for_spans(n, timeout, pred))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Sink::wait_for_metric`], blocking; panics with the sink's message on timeout.
    pub fn wait_for_metric(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&edgeward_otlp_sink::ReceivedMetric) -> bool,
    ) -> edgeward_otlp_sink::ReceivedMetric {
        self.runtime
            .block_on(self.get().wait_for_metric(name, timeout, pred))
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for BlockingSink {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            self.runtime.block_on(sink.stop());
        }
    }
}
