#!/usr/bin/env bash
# Pipeline benchmark (docs/PERFORMANCE.md, "Pipeline and export"): recorded connection events
# through batching, a one-plugin chain stand-in and OTLP/gRPC export to a local receiver.
#
#   scripts/bench-pipeline.sh              throughput: connections/s per core vs a baseline
#   scripts/bench-pipeline.sh rss          RSS at 10,000 connections/s, collector up 20 s then
#                                          down 60 s
#   extra arguments go to the benchmark (--events N --rounds R | --up S --down S --rate R)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --quiet -p edgeward-otlp-sink --bin edgeward-otlp-sink
cargo build --release --locked --quiet -p edgeward --example bench_pipeline
echo "machine: $(nproc) cores, kernel $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"
exec target/release/examples/bench_pipeline "$@" --sink-bin target/release/edgeward-otlp-sink
