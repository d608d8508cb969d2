//! `edgeward status`: what this node's agent reports on its admin endpoint, or with `--fleet`
//! what every node has written under `<prefix>/status/` in etcd.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;
use serde_json::json;

use super::{EXIT_FAILURE, EXIT_USAGE, fail};
use crate::{config, status::AgentStatus, sync::EtcdConfig};

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  edgeward status\n  edgeward status --fleet \
                        --etcd-endpoints http://etcd:2379\n  edgeward status --fleet --watch \
                        --config /etc/edgeward/edgeward.toml"
)]
pub(super) struct StatusArgs {
    /// The agent's admin address.
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "EDGEWARD_ADMIN_ADDR",
        default_value = "127.0.0.1:9464"
    )]
    admin_addr: String,
    /// Print the raw JSON document(s).
    #[arg(long)]
    json: bool,
    /// Every node's status from etcd instead of this node's.
    #[arg(long)]
    fleet: bool,
    /// With --fleet: keep printing as nodes change (Ctrl-C to stop).
    #[arg(long, requires = "fleet")]
    watch: bool,
    /// With --fleet: agent config file for etcd endpoints, prefix, TLS and credentials.
    #[arg(long, value_name = "FILE", env = "EDGEWARD_CONFIG")]
    config: Option<PathBuf>,
    /// With --fleet: etcd client URLs [key: etcd.endpoints]
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    /// With --fleet: key prefix [key: etcd.prefix]
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
}

pub(super) fn main(args: StatusArgs) -> ExitCode {
    if args.fleet {
        return fleet(&args);
    }
    let url = format!("http://{}/status", args.admin_addr);
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    let body = match agent
        .get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
    {
        Ok(body) => body,
        Err(e) => return fail(EXIT_FAILURE, &format!("{url}: {e} (is the agent running?)")),
    };
    if args.json {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    let status: AgentStatus = match serde_json::from_str(&body) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_FAILURE, &format!("{url}: unexpected answer: {e}")),
    };
    print!("{}", render(&status));
    ExitCode::SUCCESS
}

/// The etcd settings from `--config`, the environment and the flags, as `run` would use them.
pub(super) fn etcd_config(
    file: Option<&std::path::Path>,
    endpoints: Option<&Vec<String>>,
    prefix: Option<&String>,
) -> Result<EtcdConfig, ExitCode> {
    let mut flags = serde_json::Map::new();
    if let Some(e) = endpoints {
        flags.insert("endpoints".into(), json!(e));
    }
    if let Some(p) = prefix {
        flags.insert("prefix".into(), json!(p));
    }
    let flags = json!({ "etcd": flags });
    let config = config::load(file, &flags).map_err(|e| fail(EXIT_USAGE, &e))?;
    if config.etcd.endpoints.is_empty() {
        return Err(fail(
            EXIT_USAGE,
            &"no etcd endpoints: give --etcd-endpoints, EDGEWARD_ETCD_ENDPOINTS or etcd.endpoints in --config",
        ));
    }
    Ok(config.etcd)
}

fn fleet(args: &StatusArgs) -> ExitCode {
    let etcd = match etcd_config(
        args.config.as_deref(),
        args.etcd_endpoints.as_ref(),
        args.prefix.as_ref(),
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_FAILURE, &format!("starting the async runtime: {e}")),
    };
    match runtime.block_on(fleet_async(&etcd, args.json, args.watch)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_FAILURE, &e),
    }
}

async fn fleet_async(etcd: &EtcdConfig, json: bool, watch: bool) -> Result<(), String> {
    let client = etcd.connect().await.map_err(|e| e.to_string())?;
    let prefix = format!("{}/status/", etcd.prefix);
    let mut kv = client.kv_client();
    let listed = kv
        .get(
            prefix.clone(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| format!("etcd: {e}"))?;
    let mut nodes: std::collections::BTreeMap<String, Result<AgentStatus, String>> = listed
        .kvs()
        .iter()
        .map(|kv| {
            let node = String::from_utf8_lossy(kv.key())
                .trim_start_matches(&prefix)
                .to_owned();
            let status = serde_json::from_slice(kv.value()).map_err(|e| e.to_string());
            (node, status)
        })
        .collect();
    print_fleet(&nodes, json);
    if !watch {
        return Ok(());
    }
    let revision = listed.header().map_or(0, |h| h.revision());
    let mut watcher = client.watch_client();
    let mut stream = watcher
        .watch(
            prefix.clone(),
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await
        .map_err(|e| format!("etcd watch: {e}"))?;
    while let Some(response) = stream
        .message()
        .await
        .map_err(|e| format!("etcd watch: {e}"))?
    {
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let node = String::from_utf8_lossy(kv.key())
                .trim_start_matches(&prefix)
                .to_owned();
            match event.event_type() {
                etcd_client::EventType::Put => {
                    nodes.insert(
                        node,
                        serde_json::from_slice(kv.value()).map_err(|e| e.to_string()),
                    );
                }
                etcd_client::EventType::Delete => {
                    nodes.remove(&node);
                }
            }
        }
        println!();
        print_fleet(&nodes, json);
    }
    Ok(())
}

fn print_fleet(
    nodes: &std::collections::BTreeMap<String, Result<AgentStatus, String>>,
    json: bool,
) {
    if json {
        let docs: Vec<serde_json::Value> = nodes
            .iter()
            .map(|(node, s)| match s {
                Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                Err(e) => json!({ "node": node, "error": e }),
            })
            .collect();
        println!("{}", serde_json::Value::Array(docs));
        return;
    }
    println!(
        "{:<24} {:<5} {:<7} {:>9}  {:<9} PLUGINS",
        "NODE", "READY", "SOURCE", "REVISION", "PROBE"
    );
    for (node, status) in nodes {
        match status {
            Ok(s) => {
                let source = s
                    .config
                    .source
                    .map_or("-".to_owned(), |src| format!("{src:?}").to_lowercase());
                let plugins = s
                    .plugins
                    .iter()
                    .map(|p| format!("{}:{:?}", p.name, p.state).to_lowercase())
                    .collect::<Vec<_>>()
                    .join(",");
                println!(
                    "{:<24} {:<5} {:<7} {:>9}  {:<9} {}",
                    node,
                    if s.ready { "yes" } else { "no" },
                    source,
                    s.config.revision,
                    format!("{:?}", s.probe.state).to_lowercase(),
                    if plugins.is_empty() { "-" } else { &plugins }
                );
            }
            Err(e) => println!("{node:<24} unreadable status document: {e}"),
        }
    }
}

fn render(s: &AgentStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let source = s
        .config
        .source
        .map_or("none".to_owned(), |src| format!("{src:?}").to_lowercase());
    let _ = writeln!(out, "node      {}  (edgeward {})", s.node, s.version);
    let _ = writeln!(out, "ready     {}", if s.ready { "yes" } else { "no" });
    let _ = writeln!(
        out,
        "config    source={source} revision={} applied_at={}{}",
        s.config.revision,
        s.config.applied_at.as_deref().unwrap_or("-"),
        s.config
            .cache_age_seconds
            .map(|a| format!(" cache_age={a}s"))
            .unwrap_or_default()
    );
    if let Some(e) = &s.config.last_error {
        let _ = writeln!(out, "          last error: {e}");
    }
    if let Some(e) = &s.config.cache_error {
        let _ = writeln!(out, "          cache not used: {e}");
    }
    for r in &s.config.rejected {
        let _ = writeln!(
            out,
            "          rejected {} @{}: {}",
            r.key, r.revision, r.error
        );
    }
    let _ = writeln!(
        out,
        "probe     {:?} events={} drops={}{}",
        s.probe.state,
        s.probe.events,
        s.probe.drops,
        s.probe
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "plugins   {}", s.plugins.len());
    for p in &s.plugins {
        let _ = writeln!(
            out,
            "  {:<20} {:?} {}{}",
            p.name,
            p.state,
            &p.sha256.get(..12).unwrap_or(&p.sha256),
            p.last_error
                .as_deref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default()
        );
    }
    out
}
