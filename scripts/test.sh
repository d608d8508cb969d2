#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this and nothing else):
# setup if anything is missing, formatting, clippy, rustdoc, unit and integration tests.
#
# The integration tests start real etcd processes, load real eBPF programs into this kernel and
# so need root; without it they fail rather than skip.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)

step "setup (installs only what is missing)"
scripts/setup.sh

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: the integration tests load eBPF programs and need root" >&2
  exit 1
fi
# Tracepoint programs attach through tracefs.
if ! mountpoint -q /sys/kernel/tracing; then
  mount -t tracefs tracefs /sys/kernel/tracing
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --all-targets --locked -- -D warnings

step "cargo clippy for the plugins' wasm target (examples, hostile test plugins)"
cargo clippy --locked --target wasm32-wasip2 \
  -p edgeward-example-allowlist -p edgeward-example-redactor -p edgeward-example-sampler \
  -p edgeward-example-tagger -p edgeward-hostile-misbehave -p edgeward-hostile-old-interface \
  -- -D warnings

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked -p edgeward -p edgeward-common

step "cargo test (unit and integration)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --no-fail-fast 2>&1 | tee "$log"

echo
echo "test.sh: fmt, clippy, doc and tests done in $(( $(date +%s) - started )) s"
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "test.sh: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
