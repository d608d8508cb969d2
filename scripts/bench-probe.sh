#!/usr/bin/env bash
# Probe benchmark (issue 8): loopback connection churn with no probe, with the floor programs
# (count runs on the probe's tracepoints, nothing else) and with the real agent (`edgeward
# run`); then the agent's probe in a counting harness (`probe_bench full`) for completeness
# and kernel BPF time.
#
#   scripts/bench-probe.sh            # ROUNDS=16 SECONDS_PER_LEG=2 THREADS=2 FULL_ROUNDS=3
#   AGENT_B=/tmp/edgeward.new scripts/bench-probe.sh   # and a second agent binary, for A/B
#   AGENT_CAPS=full scripts/bench-probe.sh            # agents with all of root's capabilities
#   scripts/bench-probe.sh --pool OUTPUT...           # pools the rounds of saved outputs
#
# Phase 1, throughput (the kernel's BPF statistics off: they cost every program run two clock
# reads). Each round runs none, floor, none, agent: every probe leg sits between
# two no-probe legs and is divided by their mean, so the drift of a shared machine (its speed
# wanders by 5-10 % over minutes) cancels to first order; ratios are summarised as the median
# over rounds, with the quartiles and a bootstrap 95 % interval of the median, against which
# each target is called met, not met, or undecided. agent/floor is also given directly, each
# agent leg against the floor legs on either side (two legs away), which brings in fewer legs'
# noise than the quotient of the two ratios. The agent's user+sys CPU and peak RSS are read over its legs.
# With AGENT_B (another build of `edgeward`, to compare a change against this tree), each
# round goes on with a leg of it and a no-probe leg, and B is given against no probe and
# directly against the agent legs before and after it (interpolated to its place).
# The agents run with the capability set the DaemonSet and the systemd unit grant (CAP_BPF and
# CAP_PERFMON, through setpriv), as operators run them: without CAP_SYS_PTRACE the agent cannot
# read most processes' /proc entries, which changes its work. AGENT_CAPS=full runs them with
# all of root's capabilities instead.
# The generator (tests/load/churn.c) runs in a network namespace of its own
# (tcp_tw_reuse on, wide port range) so that TIME_WAIT does not cap the rate and so that the
# harness can count exactly its connections (by netns) while others use the machine.
#
# Phase 2, completeness: `probe_bench full` counts the close events of the generator's
# connections, the ring-buffer drops, and the kernel's BPF run time of the probe's programs
# (statistics enabled only while it runs), against the same from `probe_bench floor`, and
# the kernel time of the same probe in its untyped raw-tracepoint form (`--untyped`), for what
# the BTF-typed form saves.
# Needs root. Prints figures for docs/PERFORMANCE.md "## Probe".
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

ROUNDS=${ROUNDS:-16}
SECS=${SECONDS_PER_LEG:-2}
THREADS=${THREADS:-2}
FULL_ROUNDS=${FULL_ROUNDS:-3}
AGENT_B=${AGENT_B:-}
AGENT_CAPS=${AGENT_CAPS:-shipped}

# Summarises round tables: phase 1's (round, none, floor, none, agent, agent CPU %, agent RSS
# kB, none[, run]), phase 2's, and agent B's. Arguments: leg seconds, client threads, agent B
# (the first empty when pooling saved runs), then the three tables, each with a header line.
summarise() {
  awk -v secs="$1" -v threads="$2" -v agent_b="$3" '
# Heapsort: n log n without recursion (mawk has a small evaluation stack).
function sift(a, i, n,   c, t) {
  while ((c = 2 * i) <= n) {
    if (c < n && a[c + 1] > a[c]) c++
    if (a[i] >= a[c]) return
    t = a[i]; a[i] = a[c]; a[c] = t; i = c
  }
}
function sort(a, n,   i, t) {
  for (i = int(n / 2); i >= 1; i--) sift(a, i, n)
  for (i = n; i > 1; i--) { t = a[1]; a[1] = a[i]; a[i] = t; sift(a, 1, i - 1) }
}
function q(a, n, p,   b, i, k) { for (i = 1; i <= n; i++) b[i] = a[i]; sort(b, n); k = 1 + p * (n - 1); i = int(k); return (i >= n) ? b[n] : b[i] + (k - i) * (b[i + 1] - b[i]) }
# 95 % interval of the median by bootstrap (1000 resamples of the rounds, fixed seed), and
# what it says of a target: met when the whole interval is at or above it.
function ci(a, n,   r, i, x, m) { srand(1); for (r = 1; r <= 1000; r++) { for (i = 1; i <= n; i++) x[i] = a[1 + int(rand() * n)]; m[r] = q(x, n, 0.5) } lo = q(m, 1000, 0.025); hi = q(m, 1000, 0.975) }
# (With fewer than 8 rounds a resampled median says nothing: no call.)
function verdict(t, n) { return n < 8 ? "too few rounds to call" : lo >= t ? "met" : hi < t ? "not met" : "undecided at this many rounds" }
function line(name, a, n, t) {
  ci(a, n)
  printf "%s median %.3f (quartiles %.3f-%.3f; 95%% interval of the median %.3f-%.3f)", name, q(a, n, 0.5), q(a, n, 0.25), q(a, n, 0.75), lo, hi
  if (t) printf "   target >= %.2f: %s", t, verdict(t, n)
  printf "\n"
}
FNR == 1 { file++; next }
file == 1 {
  n++; none = ($2 + $4 + $8) / 3
  fr[n] = $3 / (($2 + $4) / 2); ar[n] = $5 / (($4 + $8) / 2); af[n] = ar[n] / fr[n]
  nn += none; ff += $3; aa += $5; cpu += $6; if ($7 > rss) rss = $7
  cpn[n] = $6 / 100 * 1e9 / $5
  fl[n] = $3; ag[n] = $5; run[n] = $9; if (!($9 in runs)) { runs[$9]; nruns++ }
}
file == 3 {
  nb++; br[nb] = $3 / (($2 + $4) / 2); bb[nb] = $3; bcpu += $5
}
file == 2 {
  m++; fbpf[m] = $3 / $2; pbpf[m] = $7 / $4; made += $4; act += $5; drops += $6
  if ($9 > 0) ubpf[++mu] = $9 / $8
  if ($5 < $4) short++
}
END {
  if (secs != "") printf "phase 1: %d rounds, %s s legs, %s client threads; conn/s mean: none %.0f, floor %.0f, agent %.0f\n", n, secs, threads, nn / n, ff / n, aa / n
  else printf "phase 1: %d rounds pooled from %d run(s); conn/s mean: none %.0f, floor %.0f, agent %.0f\n", n, nruns, nn / n, ff / n, aa / n
  line("floor/none: ", fr, n, 0)
  line("agent/none: ", ar, n, 0.95)
  line("agent/floor:", af, n, 0.97)
  # (Not across two runs pooled.)
  for (i = 1; i < n; i++) if (run[i] == run[i + 1]) adj[++na] = ag[i] / ((fl[i] + fl[i + 1]) / 2)
  if (na > 0) line("agent/floor, against the floor legs on either side:", adj, na, 0.97)
  printf "agent CPU: %.2f%% of one core at %.0f conn/s = %.2f%% per 10,000 conn/s (target <= 10%%); %.0f ns per connection (median); peak RSS %.1f MB (target <= 50)\n", cpu / n, aa / n, (cpu / n) / (aa / n / 10000), q(cpn, n, 0.5), rss / 1024
  printf "phase 2: kernel BPF time per connection (both ends, all programs, with the run-time statistics overhead of ~55 ns per run): floor %.0f ns, probe %.0f ns (medians)", q(fbpf, m, 0.5), q(pbpf, m, 0.5)
  if (mu > 0) printf "; the probe untyped (raw tracepoints) %.0f ns", q(ubpf, mu, 0.5)
  printf "\n"
  printf "completeness: %d active-open closes reported for %d completed connections (%d rounds short); ring-buffer drops %d\n", act, made, short, drops
  if (nb > 0) {
    # B of round i runs two legs after agent leg i and four before agent leg i + 1.
    for (i = 1; i < nb && i < n; i++) ba[++nba] = bb[i] / ((2 * ag[i] + ag[i + 1]) / 3)
    printf "agent B: %s\n", agent_b
    printf "agent B/none: median %.3f (quartiles %.3f-%.3f); its CPU %.2f%% of one core\n", q(br, nb, 0.5), q(br, nb, 0.25), q(br, nb, 0.75), bcpu / nb
    if (nba > 0) printf "agent B/agent, against the agent legs on either side (interpolated): median %.3f (quartiles %.3f-%.3f)\n", q(ba, nba, 0.5), q(ba, nba, 0.25), q(ba, nba, 0.75)
  }
}' "$4" "$5" "$6"
}

# --pool OUTPUT...: the summary of the round tables of saved outputs of this script, pooled
# (docs/perf-data/probe holds those behind docs/PERFORMANCE.md). Needs no root and runs nothing.
if [ "${1:-}" = --pool ]; then
  shift
  if [ $# -eq 0 ]; then
    echo "usage: scripts/bench-probe.sh --pool OUTPUT..." >&2
    exit 2
  fi
  pool=$(mktemp -d)
  trap 'rm -rf "$pool"' EXIT
  echo header > "$pool/rounds"
  echo header > "$pool/full"
  : > "$pool/rounds_b"
  run=0
  for f in "$@"; do
    run=$((run + 1))
    awk -v run="$run" '/^round +none +floor/ { t = 1; next } t && NF == 0 { exit }
      t { print $1, $2, $3, $4, $5, $7, $8, $6, run }' "$f" >> "$pool/rounds"
    awk '/^round +floor_conns/ { t = 1; next } t && NF == 0 { exit } t' "$f" >> "$pool/full"
  done
  summarise "" "" "" "$pool/rounds" "$pool/full" "$pool/rounds_b"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-probe.sh: loads eBPF programs and creates a network namespace: run as root" >&2
  exit 1
fi
# The set the systemd unit bounds the agent to (the DaemonSet and docs/operators.md
# "Capabilities" grant the same; tests/deploy.rs holds them together), as setpriv spells it:
# CAP_BPF CAP_PERFMON -> +bpf,+perfmon.
SHIPPED_CAPS=$(sed -n 's/^CapabilityBoundingSet=//p' deploy/systemd/edgeward.service |
  tr ' ' '\n' | sed -n 's/^CAP_\(.*\)/+\L\1/p' | paste -sd, -)
case "$AGENT_CAPS" in
  # Nothing inheritable, nothing past the shipped set.
  shipped) AGENT_PREFIX=(setpriv --inh-caps=-all --bounding-set=-all,"$SHIPPED_CAPS" --) ;;
  full) AGENT_PREFIX=() ;;
  *)
    echo "bench-probe.sh: AGENT_CAPS=$AGENT_CAPS: expected shipped ($SHIPPED_CAPS) or full" >&2
    exit 1
    ;;
esac
if [ -n "$AGENT_B" ] && [ ! -x "$AGENT_B" ]; then
  echo "bench-probe.sh: AGENT_B=$AGENT_B is not an executable file" >&2
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

# Runs the generator for one leg; prints "connections=N seconds=S rate=R".
churn() { ip netns exec "$NS" "$work/churn" "$SECS" "$THREADS"; }
# The number after "KEY=" (or after the JSON key "KEY": ) in a result line.
value_of() { sed -n "s/.*\"\?$1\"\?[=:] \?\([0-9]*\).*/\1/p" <<< "$2"; }
rate_of() { value_of rate "$1"; }
made_of() { value_of connections "$1"; }
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

leg_none() { rate_of "$(churn)"; }
leg_floor() {
  start_harness "$HARNESS" floor
  local out; out=$(churn)
  stop_harness
  rate_of "$out"
}
# Runs the agent binary $1 (default: this tree's) for one leg; prints "rate cpu_percent rss_kb".
leg_agent() {
  local bin=${1:-$AGENT} port; port=$(free_port)
  "${AGENT_PREFIX[@]}" "$bin" run --admin-addr "127.0.0.1:$port" --node-name bench --cache-dir "$work/cache" \
    2> "$work/agent.log" & bg_pid=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
  local t0 s0 out t1 s1 rss state
  t0=$(cpu_ticks "$bg_pid"); s0=$(date +%s.%N)
  out=$(churn)
  t1=$(cpu_ticks "$bg_pid"); s1=$(date +%s.%N)
  rss=$(awk '/VmHWM/ { print $2 }' "/proc/$bg_pid/status")
  state=$(curl -fs "http://127.0.0.1:$port/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["probe"]["state"])')
  kill "$bg_pid"; wait "$bg_pid" || true; bg_pid=
  [ "$state" = running ] || { echo "agent probe state: $state" >&2; cat "$work/agent.log" >&2; exit 1; }
  awk -v r="$(rate_of "$out")" -v a="$t0" -v b="$t1" -v s0="$s0" -v s1="$s1" -v hz="$TICK" -v rss="$rss" \
    'BEGIN { printf "%s %.2f %s\n", r, 100 * (b - a) / hz / (s1 - s0), rss }'
}

echo "agent capabilities: $AGENT_CAPS" >&2
echo "phase 1: throughput, $ROUNDS rounds of none/floor/none/agent${AGENT_B:+/none/agent B}, ${SECS} s legs, $THREADS client threads" >&2
printf 'round none1 floor none2 agent agent_cpu%% agent_rss_kb\n' > "$work/rounds"
printf 'round none3 agent_b none4 agent_b_cpu%%\n' > "$work/rounds_b"
n_prev=$(leg_none)
for round in $(seq "$ROUNDS"); do
  f=$(leg_floor)
  n_mid=$(leg_none)
  # An assignment, so that a failed leg (the probe not running) stops the script.
  leg=$(leg_agent)
  read -r a cpu rss <<< "$leg"
  n_next=$(leg_none)
  # floor between n_prev and n_mid, agent between n_mid and n_next
  printf '%s %s %s %s %s %s %s %s\n' "$round" "$n_prev" "$f" "$n_mid" "$a" "$cpu" "$rss" "$n_next" >> "$work/rounds"
  echo "round $round: none=$n_prev floor=$f none=$n_mid agent=$a (cpu ${cpu}%, rss ${rss} kB) none=$n_next" >&2
  n_prev=$n_next
  if [ -n "$AGENT_B" ]; then
    leg=$(leg_agent "$AGENT_B")
    read -r b bcpu _ <<< "$leg"
    n_prev=$(leg_none)
    printf '%s %s %s %s %s\n' "$round" "$n_next" "$b" "$n_prev" "$bcpu" >> "$work/rounds_b"
    echo "round $round: agent_b=$b (cpu ${bcpu}%) none=$n_prev" >&2
  fi
done

echo "phase 2: completeness and kernel time, $FULL_ROUNDS rounds of floor and full harness" >&2
printf 'round floor_conns floor_bpf_ns full_conns active_closes ringbuf_drops full_bpf_ns untyped_conns untyped_bpf_ns\n' > "$work/full"
for round in $(seq "$FULL_ROUNDS"); do
  start_harness "$HARNESS" floor --stats
  fout=$(churn)
  stop_harness
  fns=$(value_of bpf_ns "$(tail -1 "$work/harness.out")")
  start_harness "$HARNESS" full "$NS_INODE" --stats
  out=$(churn)
  stop_harness
  result=$(tail -1 "$work/harness.out")
  echo "round $round: $out | $result" >&2
  # The same probe in its untyped raw form, for the kernel time the typed form saves.
  start_harness "$HARNESS" full "$NS_INODE" --untyped --stats
  uout=$(churn)
  stop_harness
  uresult=$(tail -1 "$work/harness.out")
  printf '%s %s %s %s %s %s %s %s %s\n' "$round" "$(made_of "$fout")" "$fns" "$(made_of "$out")" \
    "$(value_of active_closes "$result")" "$(value_of ring_buffer_full "$result")" \
    "$(value_of bpf_ns "$result")" "$(made_of "$uout")" "$(value_of bpf_ns "$uresult")" >> "$work/full"
done

echo
awk '{ print $1, $2, $3, $4, $5, $8, $6, $7 }' "$work/rounds" | sed '1s/.*/round none floor none agent none agent_cpu% agent_rss_kb/' | column -t
echo
column -t "$work/full"
if [ -n "$AGENT_B" ]; then echo; column -t "$work/rounds_b"; fi
echo
echo "agent capabilities: $AGENT_CAPS${AGENT_PREFIX[*]:+ (${AGENT_PREFIX[*]})}"
summarise "$SECS" "$THREADS" "$AGENT_B" "$work/rounds" "$work/full" "$work/rounds_b"
