//! Connection events as OpenTelemetry spans: one span per connection, emitted at close.
//!
//! Attributes follow the semantic conventions where one exists (`network.*`, `process.*`,
//! `container.id`, `k8s.pod.uid`); TCP facts no convention covers are `edgeward.tcp.*`. The
//! event's plugin edits are applied last, in order, so a plugin can add, replace or remove any
//! of them.

use std::{net::SocketAddr, sync::Arc};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};

use crate::probe::event::{AttrEdit, AttrValue, ConnectionEvent, Direction};

/// The instrumentation scope of everything edgeward exports.
pub const SCOPE_NAME: &str = "edgeward";

/// What is known about this node for the resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeIdentity {
    /// `host.name`.
    pub host_name: String,
    /// `k8s.node.name`, when running under Kubernetes.
    pub k8s_node_name: Option<String>,
}

impl NodeIdentity {
    /// The hostname, and the node name as `k8s.node.name` when the process runs in a
    /// Kubernetes pod (`KUBERNETES_SERVICE_HOST` set).
    pub fn detect(node_name: &str) -> Self {
        let in_k8s = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        NodeIdentity {
            host_name: gethostname::gethostname().to_string_lossy().into_owned(),
            k8s_node_name: in_k8s.then(|| node_name.to_owned()),
        }
    }
}

/// The resource: `service.name = edgeward`, `service.version`, `host.name`, `k8s.node.name`
/// when known, then the configured extra attributes (which may override those).
pub fn resource(
    node: &NodeIdentity,
    extra: &std::collections::BTreeMap<String, String>,
) -> Resource {
    let mut attrs = vec![
        kv_str("service.name", "edgeward"),
        kv_str("service.version", crate::VERSION),
        kv_str("host.name", &node.host_name),
    ];
    if let Some(n) = &node.k8s_node_name {
        attrs.push(kv_str("k8s.node.name", n));
    }
    for (k, v) in extra {
        set(&mut attrs, k, str_value(v));
    }
    Resource {
        attributes: attrs,
        dropped_attributes_count: 0,
        entity_refs: Vec::new(),
    }
}

pub(crate) fn kv_str(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(str_value(value)),
    }
}

fn str_value(v: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(v.to_owned())),
    }
}

fn int_value(v: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(v)),
    }
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(value),
    }
}

fn set(attrs: &mut Vec<KeyValue>, key: &str, value: AnyValue) {
    match attrs.iter_mut().find(|a| a.key == key) {
        Some(a) => a.value = Some(value),
        None => attrs.push(kv(key, value)),
    }
}

fn attr_value(v: &AttrValue) -> AnyValue {
    AnyValue {
        value: Some(match v {
            AttrValue::Str(s) => any_value::Value::StringValue(s.to_string()),
            AttrValue::Int(i) => any_value::Value::IntValue(*i),
            AttrValue::Float(f) => any_value::Value::DoubleValue(*f),
            AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
        }),
    }
}

fn network_type(addr: &SocketAddr) -> &'static str {
    match addr {
        SocketAddr::V4(_) => "ipv4",
        SocketAddr::V6(_) => "ipv6",
    }
}

/// The standard attribute keys, in the order spans carry them.
const STANDARD_KEYS: [&str; 17] = [
    "network.transport",
    "network.type",
    "network.local.address",
    "network.local.port",
    "network.peer.address",
    "network.peer.port",
    "process.pid",
    "process.executable.name",
    "container.id",
    "k8s.pod.uid",
    "edgeward.tcp.bytes_sent",
    "edgeward.tcp.bytes_received",
    "edgeward.tcp.srtt_us",
    "edgeward.tcp.rttvar_us",
    "edgeward.tcp.retransmits",
    "edgeward.tcp.close_reason",
    "edgeward.tcp.started_before_probe",
];

/// The value of the standard attribute `STANDARD_KEYS[i]` for `ev` (`None`: unknown).
fn standard_value(ev: &ConnectionEvent, i: usize) -> Option<AnyValue> {
    let saturating = |v: u64| int_value(i64::try_from(v).unwrap_or(i64::MAX));
    Some(match i {
        0 => str_value("tcp"),
        1 => str_value(network_type(&ev.peer)),
        2 => str_value(&ev.local.ip().to_string()),
        3 => int_value(ev.local.port().into()),
        4 => str_value(&ev.peer.ip().to_string()),
        5 => int_value(ev.peer.port().into()),
        6 => int_value(ev.tgid.into()),
        7 => str_value(ev.executable.as_deref().unwrap_or(&ev.comm)),
        8 => str_value(ev.container_id.as_deref()?),
        9 => str_value(ev.pod_uid.as_deref()?),
        10 => saturating(ev.bytes_sent),
        11 => saturating(ev.bytes_received),
        12 => int_value(ev.srtt_us.into()),
        13 => int_value(ev.rttvar_us.into()),
        14 => int_value(ev.retransmits.into()),
        15 => str_value(ev.close_reason.as_str()),
        // Only when true: the span's start is when the agent found the connection.
        16 if ev.started_before_probe => AnyValue {
            value: Some(any_value::Value::BoolValue(true)),
        },
        _ => return None,
    })
}

/// The connection's attributes: the standard set, then the plugin edits in order.
pub fn attributes(ev: &ConnectionEvent) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(20);
    for (i, key) in STANDARD_KEYS.iter().enumerate() {
        if let Some(value) = standard_value(ev, i) {
            attrs.push(kv(key, value));
        }
    }
    apply_edits(&mut attrs, &ev.edits);
    attrs
}

/// One attribute of the connection, as [`attributes`] gives it (plugin edits applied), without
/// building the others: what a metric series key needs for events that make no span.
pub fn attribute(ev: &ConnectionEvent, key: &str) -> Option<AnyValue> {
    let mut value = STANDARD_KEYS
        .iter()
        .position(|k| *k == key)
        .and_then(|i| standard_value(ev, i));
    for edit in &ev.edits {
        match edit {
            AttrEdit::Set(k, v) if **k == *key => value = Some(attr_value(v)),
            AttrEdit::Remove(k) if **k == *key => value = None,
            _ => {}
        }
    }
    value
}

/// Applies plugin edits in order: `Set` adds or replaces, `Remove` deletes.
pub fn apply_edits(attrs: &mut Vec<KeyValue>, edits: &[AttrEdit]) {
    for edit in edits {
        match edit {
            AttrEdit::Set(key, value) => set(attrs, key, attr_value(value)),
            AttrEdit::Remove(key) => attrs.retain(|a| a.key != **key),
        }
    }
}

/// A stable, non-zero id from a few numbers (splitmix64 finaliser).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)).max(1)
}

/// Per-process salt for ids, so two agents (or two boots) never produce the same trace id for
/// the same socket cookie.
pub fn id_salt() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    mix(now ^ (u64::from(std::process::id()) << 32))
}

/// The span of a closed connection.
pub fn span(ev: &ConnectionEvent, salt: u64) -> Span {
    let (kind, name) = match ev.direction {
        Direction::Active => (SpanKind::Client, "tcp connect"),
        Direction::Passive => (SpanKind::Server, "tcp accept"),
    };
    let hi = mix(salt ^ ev.conn_id);
    let lo = mix(hi ^ ev.start_unix_nanos);
    let mut trace_id = Vec::with_capacity(16);
    trace_id.extend_from_slice(&hi.to_be_bytes());
    trace_id.extend_from_slice(&lo.to_be_bytes());
    let span_id = mix(lo ^ ev.conn_id).to_be_bytes().to_vec();
    let status = if ev.close_reason.is_error() {
        Some(Status {
            message: ev.close_reason.as_str().to_owned(),
            code: StatusCode::Error as i32,
        })
    } else {
        None
    };
    Span {
        trace_id,
        span_id,
        trace_state: String::new(),
        parent_span_id: Vec::new(),
        flags: 0x100 | 0x01, // sampled, and "is remote" known (false)
        name: name.to_owned(),
        kind: kind as i32,
        start_time_unix_nano: ev.start_unix_nanos,
        end_time_unix_nano: ev.end_unix_nanos.max(ev.start_unix_nanos),
        attributes: attributes(ev),
        dropped_attributes_count: 0,
        events: Vec::new(),
        dropped_events_count: 0,
        links: Vec::new(),
        dropped_links_count: 0,
        status,
    }
}

/// One trace export request around `spans`.
pub fn request(
    resource: &Resource,
    spans: Vec<Span>,
) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
    opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

pub(crate) fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE_NAME.to_owned(),
        version: crate::VERSION.to_owned(),
        attributes: Vec::new(),
        dropped_attributes_count: 0,
    }
}

/// Shorthand used by tests and benches: an `Arc<str>`.
pub fn arc(s: &str) -> Arc<str> {
    Arc::from(s)
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::probe::event::{AttrEdit, AttrValue, CloseReason, EventKind, SmolStr};

    /// A closed, reset client connection with three plugin edits.
    pub(crate) fn event() -> ConnectionEvent {
        ConnectionEvent {
            kind: EventKind::Close,
            conn_id: 7,
            direction: Direction::Active,
            local: "10.0.0.1:40000".parse().unwrap(),
            peer: "10.0.0.2:443".parse().unwrap(),
            pid: 100,
            tgid: 99,
            comm: SmolStr::new("curl"),
            cgroup_id: 1,
            netns: 2,
            start_unix_nanos: 1_000_000_000,
            end_unix_nanos: 1_250_000_000,
            bytes_sent: 10,
            bytes_received: 20,
            srtt_us: 300,
            rttvar_us: 40,
            retransmits: 1,
            close_reason: CloseReason::Reset,
            started_before_probe: false,
            executable: None,
            container_id: Some(arc("abc")),
            pod_uid: None,
            edits: vec![
                AttrEdit::Set(arc("team"), AttrValue::Str(arc("edge"))),
                AttrEdit::Remove(arc("network.peer.address")),
                AttrEdit::Set(arc("network.peer.port"), AttrValue::Int(1)),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{tests_support::event, *};

    #[test]
    fn one_attribute_agrees_with_the_whole_list() {
        let ev = event();
        let all = attributes(&ev);
        let mut keys: Vec<&str> = STANDARD_KEYS.to_vec();
        keys.extend(["team", "k8s.pod.uid", "not.there"]);
        for key in keys {
            let listed = all
                .iter()
                .find(|a| a.key == key)
                .and_then(|a| a.value.clone());
            assert_eq!(attribute(&ev, key), listed, "{key}");
        }
        assert_eq!(
            attribute(&ev, "network.peer.address"),
            None,
            "removed by an edit"
        );
        assert!(attribute(&ev, "team").is_some(), "added by an edit");
    }

    #[test]
    fn span_carries_conventions_edits_and_error_status() {
        let s = span(&event(), 5);
        assert_eq!(s.kind, SpanKind::Client as i32);
        assert_eq!(s.status.as_ref().unwrap().code, StatusCode::Error as i32);
        let get = |k: &str| {
            s.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(
            get("process.executable.name"),
            Some(any_value::Value::StringValue("curl".into()))
        );
        assert_eq!(get("network.peer.address"), None);
        assert_eq!(
            get("network.peer.port"),
            Some(any_value::Value::IntValue(1))
        );
        assert_eq!(
            get("team"),
            Some(any_value::Value::StringValue("edge".into()))
        );
        assert_eq!(get("k8s.pod.uid"), None);
        assert_eq!(s.trace_id.len(), 16);
        assert_eq!(s.span_id.len(), 8);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 250_000_000);
    }
}
