#!/usr/bin/env bash
# Probe benchmark (issue 8): loopback connection churn with no probe, with the floor program
# (counts inet_sock_set_state, nothing else), with the real agent (`edgeward run`), and with
# the agent's probe in a counting harness (`probe_bench full`, for completeness).
#
#   scripts/bench-probe.sh            # ROUNDS=6 SECONDS_PER_LEG=4 THREADS=2 by default
#
# Legs alternate within each round, so slow drifts of a shared machine hit every leg alike;
# ratios are computed per round against that round's no-probe leg and summarised as the
# median and the mean over rounds. The generator (tests/load/churn.c) runs in a network namespace
# of its own (tcp_tw_reuse on, wide port range) so that TIME_WAIT does not cap the rate and
# so that the harness can count exactly its connections (by netns) while others use the
# machine. Needs root. Prints figures for docs/PERFORMANCE.md "## Probe".
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

ROUNDS=${ROUNDS:-6}
SECS=${SECONDS_PER_LEG:-4}
THREADS=${THREADS:-2}

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-probe.sh: loads eBPF programs and creates a network namespace: run as root" >&2
  exit 1
fi
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing

echo "building (release)..." >&2
cargo build --release --locked -q -p edgeward --bin edgeward --example probe_bench
AGENT=target/release/edgeward
HARNESS=target/release/examples/probe_bench

work=$(mktemp -d)
NS="ewbench-$$"
cleanup() {
  [ -n "${bg_pid:-}" ] && kill "$bg_pid" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
gcc -O2 -pthread -o "$work/churn" tests/load/churn.c
ip netns add "$NS"
ip -n "$NS" link set lo up
ip netns exec "$NS" sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="32768 65000"
NS_INODE=$(stat -L -c %i "/run/netns/$NS")
TICK=$(getconf CLK_TCK)

churn() { ip netns exec "$NS" "$work/churn" "$SECS" "$THREADS" | sed -n 's/.*rate=\([0-9]*\).*/\1/p'; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts "$@" with a pipe on stdin (closing it stops the harness); waits for "ready".
start_harness() {
  rm -f "$work/harness.out" "$work/harness.err"   # never mistake the last leg's "ready"
  exec {to_harness}> >("$@" > "$work/harness.out" 2>"$work/harness.err")
  for _ in $(seq 100); do grep -q ready "$work/harness.out" 2>/dev/null && return; sleep 0.05; done
  echo "harness did not start: $(cat "$work/harness.err")" >&2; exit 1
}
stop_harness() { exec {to_harness}>&-; for _ in $(seq 100); do [ "$(wc -l < "$work/harness.out")" -ge 2 ] && break; sleep 0.05; done; }

printf 'round none floor agent full agent_cpu%% agent_rss_kb full_active_closes full_connections ringbuf_drops floor_bpf_ns/conn full_bpf_ns/conn\n' > "$work/rounds"
for round in $(seq "$ROUNDS"); do
  none=$(churn)

  start_harness "$HARNESS" floor
  floorout=$(ip netns exec "$NS" "$work/churn" "$SECS" "$THREADS")
  stop_harness
  floor=$(sed -n 's/.*rate=\([0-9]*\).*/\1/p' <<< "$floorout")
  floor_made=$(sed -n 's/.*connections=\([0-9]*\).*/\1/p' <<< "$floorout")
  floor_ns=$(tail -1 "$work/harness.out" | sed -n 's/.*bpf_ns=\([0-9]*\).*/\1/p')

  port=$(free_port)
  "$AGENT" run --admin-addr "127.0.0.1:$port" --node-name bench --cache-dir "$work/cache" \
    2> "$work/agent.log" & bg_pid=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
  t0=$(cpu_ticks "$bg_pid"); s0=$(date +%s.%N)
  agent=$(churn)
  t1=$(cpu_ticks "$bg_pid"); s1=$(date +%s.%N)
  rss=$(awk '/VmHWM/ { print $2 }' "/proc/$bg_pid/status")
  state=$(curl -fs "http://127.0.0.1:$port/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["probe"]["state"])')
  kill "$bg_pid"; wait "$bg_pid" || true; bg_pid=
  [ "$state" = running ] || { echo "agent probe state: $state" >&2; cat "$work/agent.log" >&2; exit 1; }
  cpu=$(awk -v a="$t0" -v b="$t1" -v s0="$s0" -v s1="$s1" -v hz="$TICK" 'BEGIN { printf "%.2f", 100 * (b - a) / hz / (s1 - s0) }')

  start_harness "$HARNESS" full "$NS_INODE"
  fullout=$(ip netns exec "$NS" "$work/churn" "$SECS" "$THREADS")
  stop_harness
  full=$(sed -n 's/.*rate=\([0-9]*\).*/\1/p' <<< "$fullout")
  made=$(sed -n 's/.*connections=\([0-9]*\).*/\1/p' <<< "$fullout")
  result=$(tail -1 "$work/harness.out")
  active=$(sed -n 's/.*active_closes=\([0-9]*\).*/\1/p' <<< "$result")
  rbdrops=$(sed -n 's/.*"ring_buffer_full": \([0-9]*\).*/\1/p' <<< "$result")
  full_ns=$(sed -n 's/.*bpf_ns=\([0-9]*\).*/\1/p' <<< "$result")
  echo "round $round: none=$none floor=$floor agent=$agent full=$full agent_cpu=${cpu}% rss=${rss}kB | $result" >&2
  fpc=$(awk -v n="$floor_ns" -v c="$floor_made" 'BEGIN { printf "%.0f", n / c }')
  apc=$(awk -v n="$full_ns" -v c="$made" 'BEGIN { printf "%.0f", n / c }')
  printf '%s %s %s %s %s %s %s %s %s %s %s %s\n' "$round" "$none" "$floor" "$agent" "$full" "$cpu" "$rss" "$active" "$made" "${rbdrops:-?}" "$fpc" "$apc" >> "$work/rounds"
done

echo
column -t "$work/rounds"
echo
awk 'NR > 1 {
  n++; rn[n] = $2; rf[n] = $3; ra[n] = $4; rfull[n] = $5;
  af[n] = $4 / $2; ff[n] = $3 / $2; al[n] = $4 / $3;
  cpu += $6; rate += $4; if ($7 > rss) rss = $7;
  if ($8 < $9) incomplete++; drops += $10; act += $8; made += $9
  fns[n] = $11; pns[n] = $12; cpn[n] = $6 / 100 * 1e9 / $4
}
function median(a, n,   i, j, t, b) { for (i = 1; i <= n; i++) b[i] = a[i];
  for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (b[j] < b[i]) { t = b[i]; b[i] = b[j]; b[j] = t }
  return (n % 2) ? b[(n + 1) / 2] : (b[n / 2] + b[n / 2 + 1]) / 2 }
function mean(a, n,   i, s) { s = 0; for (i = 1; i <= n; i++) s += a[i]; return s / n }
END {
  printf "rounds: %d, %s s per leg, %s client threads\n", n, '"$SECS"', '"$THREADS"'
  printf "conn/s mean: none %.0f, floor %.0f, agent %.0f, probe harness %.0f\n", mean(rn, n), mean(rf, n), mean(ra, n), mean(rfull, n)
  printf "agent/none: median %.3f, mean %.3f\n", median(af, n), mean(af, n)
  printf "floor/none: median %.3f, mean %.3f\n", median(ff, n), mean(ff, n)
  printf "agent/floor: median %.3f, mean %.3f\n", median(al, n), mean(al, n)
  printf "agent CPU: %.2f%% of one core at %.0f conn/s = %.2f%% per 10,000 conn/s; peak RSS %.1f MB\n", cpu / n, rate / n, (cpu / n) / (rate / n / 10000), rss / 1024
  printf "kernel BPF time per connection (both ends, all programs): floor %.0f ns, probe %.0f ns (medians)\n", median(fns, n), median(pns, n)
  printf "agent process CPU per connection: %.0f ns (median)\n", median(cpn, n)
  budget = 2e9 / median(rn, n)
  printf "cost model (noise-free): 2 cores / %.0f conn/s = %.0f ns of CPU per connection; probe adds %.0f ns (kernel) + %.0f ns (agent) = %.2f%%, floor %.2f%% -> expected agent/none %.3f, agent/floor %.3f\n", median(rn, n), budget, median(pns, n), median(cpn, n), 100 * (median(pns, n) + median(cpn, n)) / budget, 100 * median(fns, n) / budget, 1 / (1 + (median(pns, n) + median(cpn, n)) / budget), (1 + median(fns, n) / budget) / (1 + (median(pns, n) + median(cpn, n)) / budget)
  printf "completeness (harness): %d active-open closes reported for %d completed connections (%d rounds short); ring-buffer drops %d\n", act, made, incomplete, drops
}' "$work/rounds"
