#!/usr/bin/env bash
# RSS of the whole agent (release build: probe, pipeline, plugin host, exporter) while TCP
# connections churn on the node, first with the OTLP receiver up, then with it down, then up
# again. Prints min/max/last RSS per phase with the connection rate, where the resident memory
# is at the end of each phase (from /proc/PID/smaps), and a verdict against issue 6's target
# (<= 50 MB, i.e. 50e6 bytes = 47.7 MiB, and flat across the collector's absence).
#
#   scripts/bench-agent-rss.sh     (UP_SECS=20 DOWN_SECS=60 AGAIN_SECS=15 THREADS=2)
#
# AGENT_BIN / SINK_BIN run prebuilt binaries instead of building them; AGENT_ENV (e.g.
# "MALLOC_ARENA_MAX=2") is put in the agent's environment; SMAPS_DIR keeps a copy of the
# agent's smaps at the end of each phase, and the per-second samples.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
UP_SECS=${UP_SECS:-20}; DOWN_SECS=${DOWN_SECS:-60}; AGAIN_SECS=${AGAIN_SECS:-15}; THREADS=${THREADS:-2}
[ "$(id -u)" -eq 0 ] || { echo "bench-agent-rss.sh: needs root (eBPF, network namespaces)" >&2; exit 1; }
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
if [ -z "${AGENT_BIN:-}" ] || [ -z "${SINK_BIN:-}" ]; then
  scripts/setup.sh >/dev/null
  cargo build --locked --quiet --release -p edgeward
  cargo build --locked --quiet --release -p edgeward-otlp-sink --bin edgeward-otlp-sink
fi
AGENT_BIN=${AGENT_BIN:-target/release/edgeward}; SINK_BIN=${SINK_BIN:-target/release/edgeward-otlp-sink}

work=$(mktemp -d); NS=ew-rss-$$
cleanup() {
  kill "${agent:-}" "${sink:-}" 2>/dev/null || true; wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true; rm -rf "$work"
}
trap cleanup EXIT
gcc -O2 -pthread -o "$work/churn" tests/load/churn.c
ip netns add "$NS"; ip -n "$NS" link set lo up
ip netns exec "$NS" sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="32768 65000"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC=$(port); HTTP=$(port); ADMIN=127.0.0.1:$(port)
start_sink() {
  "$SINK_BIN" --grpc "127.0.0.1:$GRPC" --http "127.0.0.1:$HTTP" >/dev/null 2>&1 &
  sink=$!
}
start_sink
# shellcheck disable=SC2086 # AGENT_ENV is a list of NAME=VALUE words
env ${AGENT_ENV:-} "$AGENT_BIN" run --otlp-endpoint "http://127.0.0.1:$GRPC" --admin-addr "$ADMIN" \
  --cache-dir "$work/cache" --node-name rss-bench --log-level warn 2>"$work/agent.log" &
agent=$!
for _ in $(seq 100); do curl -fs "http://$ADMIN/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
state=$(curl -fs "http://$ADMIN/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["probe"]["state"])')
[ "$state" = running ] || { echo "probe is $state, not running: $(cat "$work/agent.log")" >&2; exit 1; }

# Resident memory by kind of mapping: the heap and anonymous mappings (malloc arenas, thread
# stacks, large allocations), BPF maps (the ring buffer: its data pages are mapped twice, so
# they count double here), file-backed (the binary's text and data, libraries).
breakdown() { # name
  python3 - "$agent" "$1" <<'EOF'
import os, re, sys
exe = os.readlink(f"/proc/{sys.argv[1]}/exe")
kinds = {"heap+anon": 0, "bpf maps": 0, "binary": 0, "libs": 0, "other": 0}
kind = "other"
for line in open(f"/proc/{sys.argv[1]}/smaps"):
    m = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \d+\s*(.*)$", line)
    if m:
        name = m.group(1)
        if name in ("", "[heap]") or name.startswith("[stack"): kind = "heap+anon"
        elif "bpf" in name or name.startswith("anon_inode"): kind = "bpf maps"
        elif name == exe: kind = "binary"
        elif name.startswith("/"): kind = "libs"
        else: kind = "other"
    elif line.startswith("Rss:"):
        kinds[kind] += int(line.split()[1])
print("  at end of %-14s " % sys.argv[2] + "  ".join("%s %.1f" % (k, v / 1024) for k, v in kinds.items() if v) + " MiB")
EOF
}

phase() { # name seconds
  ip netns exec "$NS" "$work/churn" "$2" "$THREADS" >"$work/churn.out" &
  local gen=$! rss
  for i in $(seq "$2"); do
    sleep 1
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")
    echo "${1// /_} $i $rss" >>"$work/samples"
  done
  wait "$gen"
  local rate; rate=$(sed -n 's/.*rate=\([0-9]*\).*/\1/p' "$work/churn.out")
  awk -v name="${1// /_}" -v rate="$rate" '$1 == name {
      if (!n++ || $3 < min) min = $3; if ($3 > max) max = $3; last = $3 }
    END { gsub("_", " ", name)
      printf "rss %-14s min %5.1f MiB  max %5.1f MiB  last %5.1f MiB  (%d samples, %s conn/s)\n", name, min/1024, max/1024, last/1024, n, rate }' "$work/samples"
  breakdown "$1"
  [ -z "${SMAPS_DIR:-}" ] || cp "/proc/$agent/smaps" "$SMAPS_DIR/${1// /_}.smaps"
}
sleep 2
echo "rss idle (probe loaded)     $(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$agent/status")"
breakdown "idle"
[ -z "${SMAPS_DIR:-}" ] || cp "/proc/$agent/smaps" "$SMAPS_DIR/idle.smaps"
phase "collector up" "$UP_SECS"
kill "$sink"; wait "$sink" 2>/dev/null || true
phase "collector down" "$DOWN_SECS"
start_sink
phase "collector back" "$AGAIN_SECS"
curl -fs "http://$ADMIN/status" | python3 -c 'import json,sys; s=json.load(sys.stdin); e=s["export"]; print("export: state=%s batches=%s dropped=%s failures=%s; probe: events=%s drops=%s" % (e["state"], e["batches"], e["dropped"], e.get("failures"), s["probe"]["events"], s["probe"]["drops"]))'

# Verdict: every phase's peak <= 50 MB (10^6 bytes), and flat. Flat is judged on the floor
# (the lowest sample of a stretch: what stays resident), which short spikes do not move but a
# climb does: while the collector is down, after the export queue has had 10 s to fill, the
# second half's floor is at most 1 MiB above the first half's, and once the collector is back
# the floor is at most 1 MiB above the down phase's. Spikes are bounded by the peak check.
python3 - "$work/samples" <<'EOF'
import sys
phases = {}
for line in open(sys.argv[1]):
    name, second, kib = line.split()
    phases.setdefault(name.replace("_", " "), []).append((int(second), int(kib) / 1024))
limit = 50e6 / 2**20
ok = True
for name, samples in phases.items():
    peak = max(mib for _, mib in samples)
    ok &= peak <= limit
    print("verdict %-14s peak %5.1f MiB = %4.1f MB  (target 50 MB)  %s"
          % (name, peak, peak * 2**20 / 1e6, "ok" if peak <= limit else "OVER"))
down = [mib for second, mib in phases["collector down"] if second > 10]
half = len(down) // 2
climb = min(down[half:]) - min(down[:half])
back = min(mib for _, mib in phases["collector back"]) - min(down)
flat = climb <= 1 and back <= 1
print("verdict flat: floor while down, 2nd half vs 1st %+.1f MiB; back vs down %+.1f MiB  %s"
      % (climb, back, "ok" if flat else "NOT FLAT"))
print("target (<= 50 MB, flat): %s" % ("met" if ok and flat else "NOT met"))
EOF
