#!/usr/bin/env bash
# RSS of the whole agent (release build: probe, pipeline, plugin host, exporter) while TCP
# connections churn on the node, first with the OTLP receiver up, then with it down for 60 s,
# then up again. Prints min/max/last RSS per phase and the connection rate.
#
#   scripts/bench-agent-rss.sh            (UP_SECS=20 DOWN_SECS=60 AGAIN_SECS=15 THREADS=1)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
UP_SECS=${UP_SECS:-20}; DOWN_SECS=${DOWN_SECS:-60}; AGAIN_SECS=${AGAIN_SECS:-15}; THREADS=${THREADS:-1}
[ "$(id -u)" -eq 0 ] || { echo "bench-agent-rss.sh: needs root (eBPF, network namespaces)" >&2; exit 1; }
scripts/setup.sh >/dev/null
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
cargo build --locked --quiet --release -p edgeward
cargo build --locked --quiet -p edgeward-otlp-sink

work=$(mktemp -d); NS=ew-rss-$$
cleanup() {
  kill "${agent:-}" "${sink:-}" 2>/dev/null || true; wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true; rm -rf "$work"
}
trap cleanup EXIT
gcc -O2 -pthread -o "$work/churn" tests/load/churn.c
ip netns add "$NS"; ip -n "$NS" link set lo up
ip netns exec "$NS" sysctl -qw net.ipv4.tcp_tw_reuse=1

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=$(port); HTTP=$(port); ADMIN=127.0.0.1:$(port)
start_sink() {
  target/debug/edgeward-otlp-sink --grpc "127.0.0.1:$GRPC" --http "127.0.0.1:$HTTP" >/dev/null 2>&1 &
  sink=$!
}
start_sink
target/release/edgeward run --otlp-endpoint "http://127.0.0.1:$GRPC" --admin-addr "$ADMIN" \
  --cache-dir "$work/cache" --node-name rss-bench --log-level warn 2>"$work/agent.log" &
agent=$!
for _ in $(seq 100); do curl -fs "http://$ADMIN/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

phase() { # name seconds
  ip netns exec "$NS" "$work/churn" "$2" "$THREADS" >"$work/churn.out" &
  local gen=$! samples=()
  for _ in $(seq "$2"); do
    sleep 1
    samples+=("$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")")
  done
  wait "$gen"
  printf '%s\n' "${samples[@]}" | sort -n | awk -v name="$1" -v last="${samples[-1]}" -v rate="$(sed -n 's/.*rate=\([0-9]*\).*/\1/p' "$work/churn.out")" \
    'NR==1{min=$1} {max=$1} END {printf "rss %-14s min %5.1f MiB  max %5.1f MiB  last %5.1f MiB  (%d samples, %s conn/s)\n", name, min/1024, max/1024, last/1024, NR, rate}'
}
phase "collector up" "$UP_SECS"
kill "$sink"; wait "$sink" 2>/dev/null || true
phase "collector down" "$DOWN_SECS"
start_sink
phase "collector back" "$AGAIN_SECS"
curl -fs "http://$ADMIN/status" | python3 -c 'import json,sys; s=json.load(sys.stdin); e=s["export"]; print("export: state=%s batches=%s dropped=%s failures=%s; probe: events=%s drops=%s" % (e["state"], e["batches"], e["dropped"], e.get("failures"), s["probe"]["events"], s["probe"]["drops"]))'
