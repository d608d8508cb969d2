#!/usr/bin/env bash
# Config sync benchmarks against a real etcd on loopback (see agent/benches/sync.rs):
# propagation p50/p99, start from cache, 1,000-watcher fleet. Pass part names to run only
# some: scripts/bench-sync.sh propagation fleet
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/setup.sh
exec cargo bench --locked -p edgeward --bench sync -- "$@"
