#!/usr/bin/env bash
# What the usage spool costs at saturation: one gateway (deploy/local/run.sh: control plane,
# mock), and two more data planes of the same build in front of it, one with its spool
# (`--data-dir`) and one without, each driven in turn at saturation by `sluice-bench load`.
# Rounds alternate ABBA (the spool first in odd rounds, last in even ones), so that the host's
# drift over a run favours neither side. Each round prints, for each side, the throughput, the
# CPU per request of the data plane and of the mock, and the whole machine's busy CPU per request
# (/proc/stat: the kernel's writeback included); the end prints the ratios spool / no spool with
# their mean, 95 % interval and median over the rounds. The steadiest figure on a shared host is
# the data plane's CPU per request divided by the mock's: the mock's work per request is fixed,
# so the ratio cancels most of what the neighbours do to both.
#
#   ./e2e/bench-spool.sh                          # target/release, 14 rounds of 6 s, 32 connections
#   ./e2e/bench-spool.sh --rounds 20 --seconds 5 --connections 64 --bin-dir DIR
#   ./e2e/bench-spool.sh -- --usage-spool-sync-interval 1s   # flags for the spooled data plane
#
# Uses ports 38080-38091, 35051 and 39090. Needs python3.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release"
rounds=14
seconds=6
connections=32
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench-spool: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
bin="$(cd "$bin" && pwd)"

run=""
data=""
pids=()
cleanup() {
  kill "${pids[@]}" $run 2>/dev/null || true
  wait 2>/dev/null || true
  [ -z "$data" ] || rm -rf "$data"
}
trap cleanup EXIT
# shellcheck source=e2e/bench-gateway.sh
. "$root/e2e/bench-gateway.sh"
start_gateway 38080 35051 38081 39090

data_plane() { # name port flags...
  local name=$1 port=$2
  shift 2
  SLUICE_DATAPLANE_TOKEN=$(cat "$data/dataplane-token") RUST_LOG=info "$bin/sluice-proxy" \
    --control-plane http://127.0.0.1:35051 --listen "127.0.0.1:$port" --node-id "bench-$name" \
    "$@" 2> "$data/$name.log" &
  pids+=($!)
}
data_plane spool 38090 --data-dir "$data/spooled" "${extra[@]}"
spool_pid=${pids[-1]}
data_plane nospool 38091
nospool_pid=${pids[-1]}
for port in 38090 38091; do
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null && break
    sleep 0.2
  done
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Bytes and calls of the write family (files and sockets alike): the spool's share is what
# the spooled side does more per request than the other.
io_counts() { awk '/^wchar|^syscw/{printf "%s ", $2}' "/proc/$1/io"; }
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
drive() { # port seconds -> requests served
  "$bin/sluice-bench" load --url "http://127.0.0.1:$1/v1" --key "$key" --model gpt-4o-mini \
    --saturate --connections "$connections" --duration "${2}s" --warmup 0s --segments 1 --timeout 30s 2>&1 \
    | grep -E '127\.0\.0\.1' | head -1 | awk -F'|' '{gsub(/ /, "", $4); print $4}'
}
# Warm both (the spool's first segments are new files; later ones reuse acked ones').
drive 38090 4 > /dev/null
drive 38091 2 > /dev/null

results="$data/rounds"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then order="spool nospool"; else order="nospool spool"; fi
  for side in $order; do
    if [ "$side" = spool ]; then port=38090 pid=$spool_pid; else port=38091 pid=$nospool_pid; fi
    p0=$(cpu_ticks "$pid") m0=$(cpu_ticks "$MOCK_PID") b0=$(busy_ticks)
    read -r w0 c0 <<< "$(io_counts "$pid")"
    n=$(drive "$port" "$seconds")
    p1=$(cpu_ticks "$pid") m1=$(cpu_ticks "$MOCK_PID") b1=$(busy_ticks)
    read -r w1 c1 <<< "$(io_counts "$pid")"
    echo "$r $side $n $((p1 - p0)) $((m1 - m0)) $((b1 - b0)) $((w1 - w0)) $((c1 - c0))" >> "$results"
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$results" "$seconds" "$(getconf CLK_TCK)" <<'PY'
import statistics, sys

path, seconds, hz = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rounds = {}
print("| round | side | req/s | data plane µs/req | mock µs/req | machine µs/req |")
print("|---|---|---|---|---|---|")
for line in open(path):
    r, side, n, proxy, mock, busy, wchar, syscw = line.split()
    n = int(n)
    us = lambda ticks: int(ticks) / hz / n * 1e6
    figures = {"rps": n / seconds, "proxy": us(proxy), "mock": us(mock), "busy": us(busy),
               "wchar": int(wchar) / n, "syscw": int(syscw) / n}
    rounds.setdefault(r, {})[side] = figures
    print(f"| {r} | {side} | {figures['rps']:,.0f} | {figures['proxy']:.1f} | {figures['mock']:.1f} | {figures['busy']:.1f} |")

ratios = {
    "throughput": lambda s, n: s["rps"] / n["rps"],
    "machine CPU per request": lambda s, n: s["busy"] / n["busy"],
    "data plane CPU per request": lambda s, n: s["proxy"] / n["proxy"],
    "data plane CPU / mock CPU": lambda s, n: (s["proxy"] / s["mock"]) / (n["proxy"] / n["mock"]),
}
pairs = [sides for sides in rounds.values() if len(sides) == 2]
print(f"\nspool / no spool over {len(pairs)} rounds:")
print("| ratio | mean | 95 % interval | median |")
print("|---|---|---|---|")
for name, ratio in ratios.items():
    xs = [ratio(p["spool"], p["nospool"]) for p in pairs]
    mean = statistics.mean(xs)
    # Student's t, two-sided 95 %, for len(xs) - 1 degrees of freedom (rounded down to a
    # tabulated count: wider, never narrower).
    table = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26,
             11: 2.23, 12: 2.20, 13: 2.18, 14: 2.16, 15: 2.14, 16: 2.13, 20: 2.09, 25: 2.06,
             30: 2.05, 60: 2.0}
    t = table[max([k for k in table if k <= len(xs)] or [2])]
    half = t * statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    print(f"| {name} | {mean:.3f} | {mean - half:.3f}–{mean + half:.3f} | {statistics.median(xs):.3f} |")

# What the spooled side writes more per request (the spool's entries and its write calls;
# its flushes are not writes).
extra = lambda key: statistics.median(p["spool"][key] - p["nospool"][key] for p in pairs)
print(f"\nthe spool writes, per request (median over the rounds): {extra('wchar'):.0f} bytes"
      f" in {extra('syscw'):.2f} write calls")
PY
