#!/usr/bin/env bash
# Plugin host benchmark: builds the example plugins (wasm32-wasip2) and the benchmark in
# release mode, then prints host time per event against a native closure, the four-example
# chain's events/s on one core, and swap latency (cold/warm/hot, p50/p99).
#
#   scripts/bench-plugins.sh            full run (~1 min after the build)
#   scripts/bench-plugins.sh --quick    fewer rounds
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --target wasm32-wasip2 --quiet \
  -p edgeward-example-allowlist -p edgeward-example-redactor \
  -p edgeward-example-sampler -p edgeward-example-tagger
cargo build --release --locked --quiet -p edgeward --example plugin-bench
# One core, as the target says ("events/s on one core").
exec taskset -c 0 target/release/examples/plugin-bench target/wasm32-wasip2/release "$@"
