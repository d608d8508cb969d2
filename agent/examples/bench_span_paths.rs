//! Why edgeward builds OTLP requests itself: CPU per connection span on two paths, measured in
//! one run on one thread, alternating over rounds.
//!
//! - `direct`: `export::spans::span` for each close event, then one `ExportTraceServiceRequest`
//!   per 512 spans, protobuf-encoded (what the exporter does).
//! - `sdk`: the OpenTelemetry SDK path `opentelemetry-otlp` takes: a span built through the
//!   `Tracer` API with explicit start/end times and the same 16 attributes, ended, handed to a
//!   span processor as `SpanData`, then grouped and converted by `opentelemetry-proto`'s
//!   transform and encoded, per 512 spans. Its batch processor's thread hand-off and its
//!   exporter are left out, so this is a lower bound for the SDK.
//!
//! `cargo run --release -p edgeward --example bench_span_paths`

use std::{
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use edgeward::{
    export::spans,
    probe::event::{CloseReason, ConnectionEvent, Direction, EventKind, SmolStr},
};
use opentelemetry::{
    KeyValue,
    trace::{Span as _, SpanKind, Tracer as _, TracerProvider as _},
};
use opentelemetry_proto::transform::{
    common::tonic::ResourceAttributesWithSchema, trace::tonic::group_spans_by_resource_and_scope,
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{SdkTracerProvider, SpanData, SpanProcessor},
};
use prost::Message as _;

#[derive(Debug, Default, Clone)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collect {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

fn events(n: usize) -> Vec<ConnectionEvent> {
    (0..n)
        .map(|i| ConnectionEvent {
            kind: EventKind::Close,
            conn_id: i as u64,
            direction: Direction::Active,
            local: ([10, 0, 0, 1], 30000 + (i % 20000) as u16).into(),
            peer: ([10, 1, (i / 250 % 250) as u8, (i % 250) as u8], 443).into(),
            pid: 1000,
            tgid: 1000,
            comm: SmolStr::new("curl"),
            cgroup_id: 1,
            netns: 1,
            start_unix_nanos: 1_700_000_000_000_000_000 + i as u64,
            end_unix_nanos: 1_700_000_000_001_000_000 + i as u64,
            bytes_sent: 100,
            bytes_received: 2000,
            srtt_us: 300,
            rttvar_us: 50,
            retransmits: 0,
            close_reason: CloseReason::Normal,
            started_before_probe: false,
            executable: Some(SmolStr::new("curl")),
            container_id: Some(Arc::from("4f1e3b0c9a8d7e6f5a4b3c2d1e0f9a8b")),
            pod_uid: None,
            edits: Vec::new(),
        })
        .collect()
}

fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(
        text.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

fn direct(evs: &[ConnectionEvent]) -> usize {
    let node = spans::NodeIdentity {
        host_name: "bench".into(),
        k8s_node_name: None,
    };
    let resource = spans::resource(&node, &Default::default());
    let mut bytes = 0;
    for chunk in evs.chunks(512) {
        let s: Vec<_> = chunk.iter().map(|e| spans::span(e, 1)).collect();
        bytes += spans::request(&resource, s).encode_to_vec().len();
    }
    bytes
}

fn sdk(evs: &[ConnectionEvent], provider: &SdkTracerProvider, collect: &Collect) -> usize {
    let tracer = provider.tracer("edgeward");
    let resource: ResourceAttributesWithSchema =
        (&Resource::builder().with_service_name("edgeward").build()).into();
    let mut bytes = 0;
    for chunk in evs.chunks(512) {
        for ev in chunk {
            // The same 16 attributes, built the SDK's way straight from the event.
            let attributes = vec![
                KeyValue::new("network.transport", "tcp"),
                KeyValue::new("network.type", "ipv4"),
                KeyValue::new("network.local.address", ev.local.ip().to_string()),
                KeyValue::new("network.local.port", i64::from(ev.local.port())),
                KeyValue::new("network.peer.address", ev.peer.ip().to_string()),
                KeyValue::new("network.peer.port", i64::from(ev.peer.port())),
                KeyValue::new("process.pid", i64::from(ev.tgid)),
                KeyValue::new(
                    "process.executable.name",
                    ev.executable.as_deref().unwrap_or(&ev.comm).to_owned(),
                ),
                KeyValue::new(
                    "container.id",
                    ev.container_id.as_deref().unwrap_or_default().to_owned(),
                ),
                KeyValue::new("edgeward.tcp.bytes_sent", ev.bytes_sent as i64),
                KeyValue::new("edgeward.tcp.bytes_received", ev.bytes_received as i64),
                KeyValue::new("edgeward.tcp.srtt_us", i64::from(ev.srtt_us)),
                KeyValue::new("edgeward.tcp.rttvar_us", i64::from(ev.rttvar_us)),
                KeyValue::new("edgeward.tcp.retransmits", i64::from(ev.retransmits)),
                KeyValue::new("edgeward.tcp.close_reason", ev.close_reason.as_str()),
            ];
            let start = UNIX_EPOCH + Duration::from_nanos(ev.start_unix_nanos);
            let end = UNIX_EPOCH + Duration::from_nanos(ev.end_unix_nanos);
            let mut span = tracer
                .span_builder("tcp connect")
                .with_kind(SpanKind::Client)
                .with_start_time(start)
                .with_attributes(attributes)
                .start(&tracer);
            span.end_with_timestamp(end);
        }
        let batch = std::mem::take(&mut *collect.0.lock().unwrap());
        let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &resource),
        };
        bytes += req.encode_to_vec().len();
    }
    bytes
}

fn main() {
    let n = 200_000;
    let evs = events(n);
    let collect = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(collect.clone())
        .build();
    println!("span paths: {n} close events per leg, one thread, CPU ns per span");
    let (mut d, mut s) = (Vec::new(), Vec::new());
    for round in 1..=5 {
        let t = thread_cpu();
        let bd = direct(&evs);
        let dn = (thread_cpu() - t).as_nanos() as f64 / n as f64;
        let t = thread_cpu();
        let bs = sdk(&evs, &provider, &collect);
        let sn = (thread_cpu() - t).as_nanos() as f64 / n as f64;
        println!(
            "round {round}: direct {dn:.0} ns/span ({bd} bytes) | sdk {sn:.0} ns/span ({bs} bytes) | sdk/direct {:.2}",
            sn / dn
        );
        d.push(dn);
        s.push(sn);
    }
    d.sort_by(f64::total_cmp);
    s.sort_by(f64::total_cmp);
    println!(
        "median: direct {:.0} ns/span ({:.0} spans/s per core), sdk {:.0} ns/span ({:.0} spans/s per core), sdk/direct {:.2}",
        d[2],
        1e9 / d[2],
        s[2],
        1e9 / s[2],
        s[2] / d[2]
    );
}
