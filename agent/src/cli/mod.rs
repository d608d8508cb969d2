//! The `edgeward` command line. `main` calls [`main`]; everything it does is here.

mod cache;
mod plugin;
mod status;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value, json};

use crate::{config, export::OtlpProtocol, logging, logging::LogFormat, runtime};

/// Exit code for bad input: a bad flag, config file or environment variable.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a failure while running.
pub const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "edgeward",
    version,
    about = "Node agent for edge fleets: etcd-synced config, WASM policy plugins, eBPF TCP \
             tracing and OpenTelemetry export",
    long_about = None,
    propagate_version = true,
    after_help = "Run `edgeward <command> --help` for the options of each command.\n\
                  Docs: docs/operators.md (running it), docs/plugin-authors.md (writing plugins)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: sync config, load plugins, trace TCP, export telemetry.
    Run(RunArgs),
    /// Check, run, publish and list WASM policy plugins.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Show this node's status from its admin endpoint.
    Status(status::StatusArgs),
    /// Look at the offline cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

/// Flags of `edgeward run`. Each also has a config key and an `EDGEWARD_*` variable; flags win.
#[derive(Debug, Args)]
#[command(
    after_help = "Precedence: flags > EDGEWARD_* environment > --config file > defaults.\n\
                        Environment variables name the key by section: EDGEWARD_ETCD_ENDPOINTS \
                        sets etcd.endpoints, EDGEWARD_ADMIN_ADDR sets admin.addr.\n\
                        Without etcd endpoints the agent runs standalone from --config-dir."
)]
struct RunArgs {
    /// Agent config file (TOML). Unknown keys are an error.
    #[arg(long, value_name = "FILE", env = "EDGEWARD_CONFIG")]
    config: Option<PathBuf>,
    /// etcd client URLs, comma-separated [key: etcd.endpoints]
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    /// Key prefix in etcd [key: etcd.prefix; default /edgeward/v1]
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// This node's name [key: node_name; default $NODE_NAME, then the hostname]
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Offline cache directory [key: cache.dir; default /var/lib/edgeward]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Standalone source: a directory laid out like the etcd prefix [key: standalone.config_dir]
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// OpenTelemetry collector endpoint [key: otlp.endpoint]
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// OTLP transport [key: otlp.protocol; default grpc]
    #[arg(long, value_name = "PROTOCOL")]
    otlp_protocol: Option<OtlpProtocol>,
    /// Admin HTTP address [key: admin.addr; default 127.0.0.1:9464]
    #[arg(long, value_name = "HOST:PORT")]
    admin_addr: Option<String>,
    /// Do not load the eBPF probe [key: probe.enabled = false]
    #[arg(long)]
    no_ebpf: bool,
    /// Log level or filter directives [key: log.level; default info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log format [key: log.format; default text]
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Print the effective configuration (defaults, file, environment and flags merged) as
    /// TOML and exit
    #[arg(long)]
    print_config: bool,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Print what the offline cache holds and whether it passes its checksum.
    Inspect(cache::InspectArgs),
}

/// Parses the command line, runs the command and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Status(args) => status::main(args),
        Command::Plugin(cmd) => plugin::main(cmd),
        Command::Cache(CacheCommand::Inspect(args)) => cache::inspect(args),
    }
}

/// Prints `edgeward: error: …` on one line.
fn fail(code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("edgeward: error: {error}");
    ExitCode::from(code)
}

fn run(args: RunArgs) -> ExitCode {
    let flags = args.overrides();
    let config = match config::load(args.config.as_deref(), &flags) {
        Ok(config) => config,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    if args.print_config {
        return match toml::to_string_pretty(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_FAILURE, &format!("printing the configuration: {e}")),
        };
    }
    logging::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgeward")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_FAILURE, &format!("starting the async runtime: {e}")),
    };
    match runtime.block_on(runtime::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(runtime::RunError::Config(e)) => fail(EXIT_USAGE, &e),
        Err(e) => {
            tracing::error!(error = %e, "edgeward failed");
            fail(EXIT_FAILURE, &e)
        }
    }
}

impl RunArgs {
    /// The flags that were given, as a tree of config keys.
    fn overrides(&self) -> Value {
        let mut root = Map::new();
        let mut set = |section: Option<&str>, key: &str, value: Value| match section {
            None => {
                root.insert(key.to_owned(), value);
            }
            Some(section) => {
                let entry = root
                    .entry(section.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(map) = entry {
                    map.insert(key.to_owned(), value);
                }
            }
        };
        if let Some(v) = &self.etcd_endpoints {
            set(Some("etcd"), "endpoints", json!(v));
        }
        if let Some(v) = &self.prefix {
            set(Some("etcd"), "prefix", json!(v));
        }
        if let Some(v) = &self.node_name {
            set(None, "node_name", json!(v));
        }
        if let Some(v) = &self.cache_dir {
            set(Some("cache"), "dir", json!(v));
        }
        if let Some(v) = &self.config_dir {
            set(Some("standalone"), "config_dir", json!(v));
        }
        if let Some(v) = &self.otlp_endpoint {
            set(Some("otlp"), "endpoint", json!(v));
        }
        if let Some(v) = self.otlp_protocol {
            set(Some("otlp"), "protocol", json!(v));
        }
        if let Some(v) = &self.admin_addr {
            set(Some("admin"), "addr", json!(v));
        }
        if self.no_ebpf {
            set(Some("probe"), "enabled", json!(false));
        }
        if let Some(v) = &self.log_level {
            set(Some("log"), "level", json!(v));
        }
        if let Some(v) = self.log_format {
            set(Some("log"), "format", json!(v));
        }
        Value::Object(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_become_config_keys() {
        let cli = Cli::try_parse_from([
            "edgeward",
            "run",
            "--etcd-endpoints",
            "http://a:2379,http://b:2379",
            "--no-ebpf",
            "--node-name",
            "n1",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let flags = args.overrides();
        assert_eq!(
            flags["etcd"]["endpoints"],
            json!(["http://a:2379", "http://b:2379"])
        );
        assert_eq!(flags["probe"]["enabled"], json!(false));
        assert_eq!(flags["node_name"], json!("n1"));
    }
}
