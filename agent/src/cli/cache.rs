//! `edgeward cache inspect`: what the offline cache holds and whether it passes its checks.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use clap::Args;

use super::{EXIT_FAILURE, fail};
use crate::sync::cache;

#[derive(Debug, Args)]
pub(super) struct InspectArgs {
    /// The agent's cache directory [key: cache.dir]
    #[arg(
        long,
        value_name = "DIR",
        env = "EDGEWARD_CACHE_DIR",
        default_value = "/var/lib/edgeward"
    )]
    cache_dir: PathBuf,
    /// Print JSON: {"revision", "keys": [{"key", "mod_revision", "size"}], "checksum", …}
    #[arg(long)]
    json: bool,
}

/// Prints the inspection; exits 1 when there is no cache or it fails its checks.
pub(super) fn inspect(args: InspectArgs) -> ExitCode {
    let inspection = match cache::inspect(&args.cache_dir) {
        Ok(i) => i,
        Err(e) => return fail(EXIT_FAILURE, &e),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&inspection).unwrap_or_default()
        );
    } else {
        print!("{}", render(&inspection));
    }
    if inspection.checksum == "ok" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}

fn render(i: &cache::Inspection) -> String {
    let mut out = String::new();
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let _ = writeln!(out, "cache      {}", i.path.display());
    let _ = writeln!(out, "checksum   {}", i.checksum);
    let _ = writeln!(out, "prefix     {}", dash(i.prefix.clone()));
    let _ = writeln!(
        out,
        "revision   {}",
        dash(i.revision.map(|r| r.to_string()))
    );
    let _ = writeln!(
        out,
        "written    {}{}",
        dash(i.written_at.clone()),
        i.age_seconds
            .map(|a| format!(" ({a} s ago)"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "modules    {}", i.modules.len());
    for m in &i.modules {
        let _ = writeln!(out, "  sha256:{m}");
    }
    if !i.keys.is_empty() {
        let width = i.keys.iter().map(|k| k.key.len()).max().unwrap_or(3).max(3);
        let _ = writeln!(
            out,
            "\n{:<width$}  {:>12}  {:>9}",
            "KEY", "MOD_REVISION", "BYTES"
        );
        for k in &i.keys {
            let _ = writeln!(
                out,
                "{:<width$}  {:>12}  {:>9}",
                k.key, k.mod_revision, k.size
            );
        }
    }
    out
}
