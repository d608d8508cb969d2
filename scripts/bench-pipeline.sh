#!/usr/bin/env bash
# Pipeline benchmark (docs/PERFORMANCE.md, "Pipeline and export"): recorded connection events
# through batching, a one-plugin chain stand-in and OTLP/gRPC export to a local receiver.
#
#   scripts/bench-pipeline.sh              throughput: connections/s per core vs a baseline
#   scripts/bench-pipeline.sh rss          RSS at 10,000 connections/s, collector up 20 s then
#                                          down 60 s
#   extra arguments go to the benchmark (--events N --rounds R | --up S --down S --rate R)
#
# BENCH_TARGET=x86_64-unknown-linux-musl builds the benchmark for another target, here the
# static release binary's (docs/PERFORMANCE.md, "Release binary"); the receiver binary of `rss`
# stays a host build.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
target_args=()
bench_dir=target/release/examples
if [ -n "${BENCH_TARGET:-}" ]; then
  target_args=(--target "$BENCH_TARGET")
  bench_dir=target/$BENCH_TARGET/release/examples
fi
cargo build --release --locked --quiet -p edgeward-otlp-sink --bin edgeward-otlp-sink
cargo build --release --locked --quiet -p edgeward --example bench_pipeline "${target_args[@]}"
echo "machine: $(nproc) cores, kernel $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)," \
  "target: ${BENCH_TARGET:-$(rustc -vV | sed -n 's/^host: //p')}"
exec "$bench_dir/bench_pipeline" "$@" --sink-bin target/release/edgeward-otlp-sink
