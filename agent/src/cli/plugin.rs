//! `edgeward plugin check|run|publish|list`: the plugin author's and operator's tools.

use std::{
    collections::BTreeMap,
    io::BufRead as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{EXIT_FAILURE, EXIT_USAGE, fail};
use crate::{
    plugins::{
        FailurePolicy, ModuleLocation, PluginError, PluginInstance, PluginLimits, PluginManifest,
        PluginMetrics, PluginRuntime, manifest::BLOB_CHUNK_SIZE,
    },
    probe::event::{
        AttrEdit, AttrValue, CloseReason, ConnectionEvent, Direction, EventKind, SmolStr,
    },
    status::AgentStatus,
};

#[derive(Debug, Subcommand)]
pub(super) enum PluginCommand {
    /// Validate a plugin module and run its init with a config.
    Check(CheckArgs),
    /// Run a plugin on recorded events and print its verdicts.
    Run(RunArgs),
    /// Upload a plugin module and its manifest to etcd.
    Publish(PublishArgs),
    /// List the plugins in etcd and the nodes that run them.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub(super) struct CheckArgs {
    /// The plugin component (`.wasm`).
    file: PathBuf,
    /// Configuration handed to `init`, as JSON.
    #[arg(long, value_name = "JSON", default_value = "null")]
    config: String,
}

#[derive(Debug, Args)]
pub(super) struct RunArgs {
    /// The plugin component (`.wasm`).
    file: PathBuf,
    /// Configuration handed to `init`, as JSON.
    #[arg(long, value_name = "JSON", default_value = "null")]
    config: String,
    /// Recorded events, one JSON object per line (see docs/plugin-authors.md).
    #[arg(long, value_name = "FILE.jsonl")]
    events: PathBuf,
    /// Events per batch handed to the plugin.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Time one batch may take.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    batch_timeout: Duration,
    /// Memory the plugin may use, MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u32,
}

#[derive(Debug, Args)]
pub(super) struct EtcdArgs {
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        env = "EDGEWARD_ETCD_ENDPOINTS",
        required = true
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix in etcd.
    #[arg(
        long,
        value_name = "PREFIX",
        env = "EDGEWARD_ETCD_PREFIX",
        default_value = "/edgeward/v1"
    )]
    prefix: String,
}

#[derive(Debug, Args)]
pub(super) struct PublishArgs {
    /// The plugin component (`.wasm`).
    file: PathBuf,
    /// The plugin's name (its key is `<prefix>/plugins/<name>`).
    #[arg(long)]
    name: String,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// The plugin's own version (informational).
    #[arg(long = "plugin-version", value_name = "VERSION", default_value = "")]
    plugin_version: String,
    /// Configuration handed to `init`, as JSON.
    #[arg(long, value_name = "JSON", default_value = "null")]
    config: String,
    /// Position in the chain: lower runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    order: i32,
    /// What an error of the plugin does to a batch: fail_open or fail_closed.
    #[arg(long, value_name = "POLICY", default_value = "fail_open", value_parser = parse_policy)]
    failure_policy: FailurePolicy,
    /// Time one batch may take (capped by each agent's plugins.max_batch_timeout).
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = humantime::parse_duration)]
    batch_timeout: Duration,
    /// Memory the plugin may use, MiB (capped by each agent's plugins.max_memory_mib).
    #[arg(long, default_value_t = 16)]
    memory_mib: u32,
    /// Run only on nodes whose name matches (`*` wildcards); repeatable.
    #[arg(long = "node", value_name = "PATTERN")]
    nodes: Vec<String>,
    /// Run only on nodes with this label; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Publish the manifest with `enabled: false`.
    #[arg(long)]
    disabled: bool,
    /// Serve the module from this https URL instead of etcd (the file is still hashed and
    /// checked).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Publish only if the manifest key is at this revision (0: only if it does not exist).
    /// Default: the revision read just before publishing.
    #[arg(long, value_name = "REVISION")]
    expect_revision: Option<i64>,
}

#[derive(Debug, Args)]
pub(super) struct ListArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_policy(s: &str) -> Result<FailurePolicy, String> {
    serde_json::from_value(Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?} is not a failure policy (fail_open or fail_closed)"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub(super) fn main(cmd: PluginCommand) -> ExitCode {
    match cmd {
        PluginCommand::Check(args) => check(args),
        PluginCommand::Run(args) => run(args),
        PluginCommand::Publish(args) => publish(args),
        PluginCommand::List(args) => list(args),
    }
}

/// Bad input (exit 2) or a failure (exit 1), with its message.
enum Failure {
    Usage(String),
    Plugin(String),
}

impl From<PluginError> for Failure {
    fn from(e: PluginError) -> Self {
        Self::Plugin(e.to_string())
    }
}

fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => fail(EXIT_USAGE, &m),
        Err(Failure::Plugin(m)) => fail(EXIT_FAILURE, &m),
    }
}

fn parse_config(text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text)
        .map_err(|e| Failure::Usage(format!("--config {text:?} is not JSON: {e}")))
}

fn read_module(file: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(file).map_err(|e| Failure::Usage(format!("{}: {e}", file.display())))
}

fn plugin_name(file: &Path) -> String {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if name.is_empty() {
        "plugin".to_owned()
    } else {
        name
    }
}

/// Compiles, links and starts a module from a file, as the agent would.
fn load(
    file: &Path,
    bytes: &[u8],
    config: Value,
    limits: PluginLimits,
) -> Result<
    (
        Arc<PluginRuntime>,
        Arc<PluginInstance>,
        crate::plugins::ModuleInfo,
    ),
    Failure,
> {
    let runtime = PluginRuntime::new(None, PluginMetrics::unregistered())?;
    let name = plugin_name(file);
    let sha256 = crate::plugins::engine::sha256_hex(bytes);
    let component = runtime.compile(&name, &sha256, bytes)?;
    let info = runtime.describe(&sha256, bytes.len(), &component);
    let manifest = PluginManifest {
        name: name.clone(),
        version: String::new(),
        sha256,
        module: ModuleLocation::Etcd {
            size: bytes.len() as u64,
            chunks: 1,
        },
        config,
        order: 0,
        failure_policy: FailurePolicy::FailOpen,
        limits,
        node_selector: Default::default(),
        enabled: true,
        capabilities: Vec::new(),
    };
    let pre = runtime.prepare(&name, &component, &[])?;
    let instance = PluginInstance::start(
        &runtime,
        &manifest,
        pre,
        limits.batch_timeout,
        limits.memory_mib,
        u32::MAX,
        None,
    )?;
    Ok((runtime, instance, info))
}

fn check(args: CheckArgs) -> ExitCode {
    finish((|| {
        let config = parse_config(&args.config)?;
        let bytes = read_module(&args.file)?;
        let limits = PluginLimits {
            batch_timeout: Duration::from_secs(1),
            memory_mib: 64,
        };
        let (_runtime, instance, info) = load(&args.file, &bytes, config, limits)?;
        println!("plugin:    {}", args.file.display());
        println!("name:      {} (from the file name)", instance.name());
        println!("sha256:    {}", info.sha256);
        println!("size:      {} bytes", info.size);
        println!("interface: {} (ok)", crate::plugins::INTERFACE);
        println!("exports:   {}", info.exports.join(", "));
        println!(
            "imports:   {}",
            if info.imports.is_empty() {
                "(none)".to_owned()
            } else {
                info.imports.join(", ")
            }
        );
        println!("init:      ok (config {})", args.config);
        Ok(())
    })())
}

/// An event as `plugin run` reads it: every field optional, with the defaults of a closed,
/// healthy, active IPv4 connection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EventLine {
    kind: String,
    conn_id: u64,
    direction: String,
    local: SocketAddr,
    peer: SocketAddr,
    pid: u32,
    tgid: u32,
    comm: String,
    cgroup_id: u64,
    netns: u32,
    start_unix_nanos: u64,
    end_unix_nanos: u64,
    bytes_sent: u64,
    bytes_received: u64,
    srtt_us: u32,
    rttvar_us: u32,
    retransmits: u32,
    close_reason: String,
    executable: Option<String>,
    container_id: Option<String>,
    pod_uid: Option<String>,
    started_before_probe: bool,
}

impl Default for EventLine {
    fn default() -> Self {
        Self {
            kind: "close".to_owned(),
            conn_id: 0,
            direction: "active".to_owned(),
            local: SocketAddr::from(([127, 0, 0, 1], 0)),
            peer: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid: 0,
            tgid: 0,
            comm: String::new(),
            cgroup_id: 0,
            netns: 0,
            start_unix_nanos: 0,
            end_unix_nanos: 0,
            bytes_sent: 0,
            bytes_received: 0,
            srtt_us: 0,
            rttvar_us: 0,
            retransmits: 0,
            close_reason: "normal".to_owned(),
            executable: None,
            container_id: None,
            pod_uid: None,
            started_before_probe: false,
        }
    }
}

impl EventLine {
    fn into_event(self) -> Result<ConnectionEvent, String> {
        let kind = match self.kind.as_str() {
            "open" => EventKind::Open,
            "update" => EventKind::Update,
            "close" => EventKind::Close,
            other => return Err(format!("kind {other:?} (open, update or close)")),
        };
        let direction = match self.direction.as_str() {
            "active" => Direction::Active,
            "passive" => Direction::Passive,
            other => return Err(format!("direction {other:?} (active or passive)")),
        };
        let close_reason = match self.close_reason.as_str() {
            "open" => CloseReason::Open,
            "normal" => CloseReason::Normal,
            "reset" => CloseReason::Reset,
            "refused" => CloseReason::Refused,
            "timed_out" => CloseReason::TimedOut,
            other => {
                return Err(format!(
                    "close_reason {other:?} (open, normal, reset, refused or timed_out)"
                ));
            }
        };
        Ok(ConnectionEvent {
            kind,
            conn_id: self.conn_id,
            direction,
            local: self.local,
            peer: self.peer,
            pid: self.pid,
            tgid: self.tgid,
            comm: SmolStr::new(self.comm),
            cgroup_id: self.cgroup_id,
            netns: self.netns,
            start_unix_nanos: self.start_unix_nanos,
            end_unix_nanos: self.end_unix_nanos,
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            srtt_us: self.srtt_us,
            rttvar_us: self.rttvar_us,
            retransmits: self.retransmits,
            close_reason,
            started_before_probe: self.started_before_probe,
            executable: self.executable.map(SmolStr::new),
            container_id: self.container_id.map(Arc::from),
            pod_uid: self.pod_uid.map(Arc::from),
            edits: Vec::new(),
        })
    }
}

fn attr_json(v: &AttrValue) -> Value {
    match v {
        AttrValue::Str(s) => json!(&**s),
        AttrValue::Int(i) => json!(i),
        AttrValue::Float(f) => json!(f),
        AttrValue::Bool(b) => json!(b),
    }
}

/// The key of the marker edit `plugin run` puts first on each event to find it again after
/// the plugin dropped some (plugins never see edits).
const LINE_MARKER: &str = "\u{0}edgeward-line";

fn run(args: RunArgs) -> ExitCode {
    finish((|| {
        let config = parse_config(&args.config)?;
        if args.batch_size == 0 {
            return Err(Failure::Usage("--batch-size must be 1 or more".to_owned()));
        }
        let file = std::fs::File::open(&args.events)
            .map_err(|e| Failure::Usage(format!("{}: {e}", args.events.display())))?;
        let mut events = Vec::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line =
                line.map_err(|e| Failure::Usage(format!("{}: {e}", args.events.display())))?;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |e: String| {
                Failure::Usage(format!("{} line {}: {e}", args.events.display(), i + 1))
            };
            let parsed: EventLine = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
            let mut event = parsed.into_event().map_err(bad)?;
            event.edits.push(AttrEdit::Set(
                Arc::from(LINE_MARKER),
                AttrValue::Int(i as i64 + 1),
            ));
            events.push(event);
        }
        let bytes = read_module(&args.file)?;
        let limits = PluginLimits {
            batch_timeout: args.batch_timeout,
            memory_mib: args.memory_mib,
        };
        let (_runtime, instance, _) = load(&args.file, &bytes, config, limits)?;
        let (mut kept, mut dropped) = (0usize, 0usize);
        for chunk in events.chunks(args.batch_size) {
            let mut batch = chunk.to_vec();
            if let crate::plugins::BatchResult::Failed(e) = instance.run(&mut batch) {
                return Err(Failure::Plugin(e.to_string()));
            }
            let mut survivors = batch.iter().peekable();
            for original in chunk {
                let line = marker(original);
                let survivor = survivors.next_if(|e| marker(e) == line);
                let out = match survivor {
                    Some(e) => {
                        kept += 1;
                        let edits: Vec<Value> = e
                            .edits
                            .iter()
                            .skip(1)
                            .map(|edit| match edit {
                                AttrEdit::Set(k, v) => json!({"set": &**k, "value": attr_json(v)}),
                                AttrEdit::Remove(k) => json!({"remove": &**k}),
                            })
                            .collect();
                        json!({"line": line, "conn_id": e.conn_id, "verdict": "keep", "edits": edits})
                    }
                    None => {
                        dropped += 1;
                        json!({"line": line, "conn_id": original.conn_id, "verdict": "drop"})
                    }
                };
                println!("{out}");
            }
        }
        eprintln!("{} events: {kept} kept, {dropped} dropped", kept + dropped);
        Ok(())
    })())
}

fn marker(e: &ConnectionEvent) -> i64 {
    match e.edits.first() {
        Some(AttrEdit::Set(k, AttrValue::Int(i))) if &**k == LINE_MARKER => *i,
        _ => 0,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Plugin(format!("starting the async runtime: {e}")))
}

async fn connect(etcd: &EtcdArgs) -> Result<etcd_client::Client, Failure> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    etcd_client::Client::connect(etcd.etcd_endpoints.clone(), Some(options))
        .await
        .map_err(|e| Failure::Plugin(format!("etcd {}: {e}", etcd.etcd_endpoints.join(","))))
}

/// etcd refuses requests larger than about 1.5 MiB; above this, chunks go first.
const ONE_TXN_LIMIT: usize = 1400 * 1024;

fn publish(args: PublishArgs) -> ExitCode {
    finish((|| {
        let config = parse_config(&args.config)?;
        let bytes = read_module(&args.file)?;
        let sha256 = crate::plugins::engine::sha256_hex(&bytes);
        let limits = PluginLimits {
            batch_timeout: args.batch_timeout,
            memory_mib: args.memory_mib,
        };
        let module = match &args.url {
            Some(url) => ModuleLocation::Url(url.clone()),
            None => ModuleLocation::Etcd {
                size: bytes.len() as u64,
                chunks: bytes.len().div_ceil(BLOB_CHUNK_SIZE).max(1) as u32,
            },
        };
        let manifest = PluginManifest {
            name: args.name.clone(),
            version: args.plugin_version.clone(),
            sha256: sha256.clone(),
            module,
            config: config.clone(),
            order: args.order,
            failure_policy: args.failure_policy,
            limits,
            node_selector: crate::plugins::NodeSelector {
                names: args.nodes.clone(),
                labels: args.labels.iter().cloned().collect(),
            },
            enabled: !args.disabled,
            capabilities: Vec::new(),
        };
        let manifest_json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Failure::Plugin(format!("encoding the manifest: {e}")))?;
        // The same validation the agents apply, so a bad flag fails here, not on every node.
        PluginManifest::parse(&args.name, &manifest_json)
            .map_err(|e| Failure::Usage(e.to_string()))?;
        // Refuse what no agent could load: compile, link and init it here first.
        load(&args.file, &bytes, config, limits)?;

        let prefix = args.etcd.prefix.trim_end_matches('/').to_owned();
        let key = format!("{prefix}/plugins/{}", args.name);
        let rt = runtime()?;
        rt.block_on(async {
            use etcd_client::{Compare, CompareOp, Txn, TxnOp};
            let mut client = connect(&args.etcd).await?;
            let etcd_err = |e: etcd_client::Error| Failure::Plugin(format!("etcd: {e}"));
            let current = client.get(key.as_str(), None).await.map_err(etcd_err)?;
            let found = current.kvs().first().map_or(0, |kv| kv.mod_revision());
            let expect = args.expect_revision.unwrap_or(found);
            let guard = if expect == 0 {
                Compare::version(key.as_str(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.as_str(), CompareOp::Equal, expect)
            };
            let mut ops = Vec::new();
            if args.url.is_none() {
                for (i, chunk) in bytes.chunks(BLOB_CHUNK_SIZE).enumerate() {
                    let chunk_key = PluginManifest::blob_chunk_key(&prefix, &sha256, i as u32);
                    ops.push(TxnOp::put(chunk_key, chunk.to_vec(), None));
                }
            }
            if bytes.len() > ONE_TXN_LIMIT && args.url.is_none() {
                // Too big for one request: the chunks (content-addressed, harmless on their
                // own) go first, one per request; the manifest stays guarded.
                for op in ops.drain(..) {
                    client
                        .txn(Txn::new().and_then(vec![op]))
                        .await
                        .map_err(etcd_err)?;
                }
            }
            ops.push(TxnOp::put(key.as_str(), manifest_json.clone(), None));
            let txn = Txn::new().when(vec![guard]).and_then(ops);
            let response = client.txn(txn).await.map_err(etcd_err)?;
            if !response.succeeded() {
                let now = client.get(key.as_str(), None).await.map_err(etcd_err)?;
                let at = now.kvs().first().map_or(0, |kv| kv.mod_revision());
                return Err(Failure::Plugin(format!(
                    "{key} changed while publishing (expected revision {expect}, now {at}); \
                     nothing was written; re-run to publish over it"
                )));
            }
            let revision = response.header().map_or(0, |h| h.revision());
            println!(
                "published {} sha256 {} ({} bytes) at {key}, revision {revision}",
                args.name,
                sha256,
                bytes.len()
            );
            Ok(())
        })
    })())
}

fn list(args: ListArgs) -> ExitCode {
    finish((|| {
        let prefix = args.etcd.prefix.trim_end_matches('/').to_owned();
        let rt = runtime()?;
        let (manifests, nodes) = rt.block_on(async {
            let mut client = connect(&args.etcd).await?;
            let etcd_err = |e: etcd_client::Error| Failure::Plugin(format!("etcd: {e}"));
            let with_prefix = || Some(etcd_client::GetOptions::new().with_prefix());
            let plugins_prefix = format!("{prefix}/plugins/");
            let plugins = client
                .get(plugins_prefix.as_str(), with_prefix())
                .await
                .map_err(etcd_err)?;
            let mut manifests = Vec::new();
            for kv in plugins.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let name = key.trim_start_matches(&plugins_prefix).to_owned();
                manifests.push((key, name.clone(), PluginManifest::parse(&name, kv.value())));
            }
            let status_prefix = format!("{prefix}/status/");
            let statuses = client
                .get(status_prefix.as_str(), with_prefix())
                .await
                .map_err(etcd_err)?;
            let mut nodes = BTreeMap::new();
            for kv in statuses.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let node = key.trim_start_matches(&status_prefix).to_owned();
                if let Ok(status) = serde_json::from_slice::<AgentStatus>(kv.value()) {
                    nodes.insert(node, status);
                }
            }
            Ok::<_, Failure>((manifests, nodes))
        })?;

        let mut rows = Vec::new();
        for (key, name, parsed) in &manifests {
            let (running, failing): (Vec<_>, Vec<_>) = nodes
                .iter()
                .filter_map(|(node, s)| {
                    let p = s.plugins.iter().find(|p| p.name == *name)?;
                    let matches = parsed.as_ref().is_ok_and(|m| m.sha256 == p.sha256);
                    Some((node.clone(), p.state, matches))
                })
                .partition(|(_, state, matches)| {
                    *matches && *state == crate::status::PluginState::Active
                });
            let row = match parsed {
                Ok(m) => json!({
                    "name": name,
                    "key": key,
                    "version": m.version,
                    "sha256": m.sha256,
                    "order": m.order,
                    "failure_policy": m.failure_policy,
                    "enabled": m.enabled,
                    "running_on": running.iter().map(|(n, _, _)| n).collect::<Vec<_>>(),
                    "not_running_on": failing.iter().map(|(n, s, matches)| json!({
                        "node": n, "state": s, "same_sha256": matches,
                    })).collect::<Vec<_>>(),
                }),
                Err(e) => json!({"name": name, "key": key, "error": e.to_string()}),
            };
            rows.push(row);
        }
        if args.json {
            println!(
                "{}",
                json!({"plugins": rows, "nodes": nodes.keys().collect::<Vec<_>>()})
            );
            return Ok(());
        }
        println!(
            "{:<24} {:<10} {:<14} {:>6} {:<12} {:<8} RUNNING ON",
            "NAME", "VERSION", "SHA256", "ORDER", "POLICY", "ENABLED"
        );
        for row in &rows {
            if let Some(e) = row.get("error") {
                println!(
                    "{:<24} invalid manifest: {}",
                    row["name"].as_str().unwrap_or(""),
                    e
                );
                continue;
            }
            let running: Vec<&str> = row["running_on"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            println!(
                "{:<24} {:<10} {:<14} {:>6} {:<12} {:<8} {}",
                row["name"].as_str().unwrap_or(""),
                row["version"].as_str().unwrap_or(""),
                row["sha256"].as_str().unwrap_or("").get(..12).unwrap_or(""),
                row["order"],
                row["failure_policy"].as_str().unwrap_or(""),
                row["enabled"],
                if running.is_empty() {
                    "-".to_owned()
                } else {
                    running.join(",")
                }
            );
        }
        Ok(())
    })())
}
