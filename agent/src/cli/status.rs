//! `edgeward status`: what this node's agent reports on its admin endpoint.

use std::{process::ExitCode, time::Duration};

use clap::Args;

use super::{EXIT_FAILURE, fail};
use crate::status::AgentStatus;

#[derive(Debug, Args)]
pub(super) struct StatusArgs {
    /// The agent's admin address.
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "EDGEWARD_ADMIN_ADDR",
        default_value = "127.0.0.1:9464"
    )]
    admin_addr: String,
    /// Print the raw JSON document.
    #[arg(long)]
    json: bool,
    /// Every node's status from etcd instead of this node's (not available yet).
    #[arg(long)]
    fleet: bool,
}

pub(super) fn main(args: StatusArgs) -> ExitCode {
    if args.fleet {
        return super::not_yet("status --fleet");
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
        "config    source={source} revision={} applied_at={}",
        s.config.revision,
        s.config.applied_at.as_deref().unwrap_or("-")
    );
    if let Some(e) = &s.config.last_error {
        let _ = writeln!(out, "          last error: {e}");
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
