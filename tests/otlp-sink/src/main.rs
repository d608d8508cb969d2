//! `edgeward-otlp-sink`: an OTLP receiver that prints every span and metric point it gets, one
//! readable line each. For the demo and for looking at what an agent sends.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use edgeward_otlp_sink::{Sink, SinkOptions};

/// Receives OTLP over gRPC and HTTP/protobuf and prints what arrives.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:4317")]
    grpc: SocketAddr,
    /// HTTP listen address.
    #[arg(long, default_value = "127.0.0.1:4318")]
    http: SocketAddr,
    /// Print nothing per span and keep nothing: count only (for benchmarks).
    #[arg(long)]
    quiet: bool,
    /// Exit after this long (e.g. `30s`); by default run until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = humantime_duration)]
    duration: Option<Duration>,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration {s:?}: use ms, s or m")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sink = Sink::start_with(SinkOptions {
        grpc_addr: Some(args.grpc),
        http_addr: Some(args.http),
        print: !args.quiet,
        discard: args.quiet,
        ..SinkOptions::default()
    })
    .await?;
    eprintln!(
        "edgeward-otlp-sink: OTLP/gRPC on {}, OTLP/HTTP on {}",
        sink.grpc_endpoint(),
        sink.http_endpoint()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let wait = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = wait => {}
    }
    let (traces, metrics, _) = sink.request_counts();
    eprintln!(
        "edgeward-otlp-sink: {} spans in {traces} requests, {metrics} metric requests",
        sink.span_total()
    );
    sink.stop().await;
    Ok(())
}
