#!/usr/bin/env bash
# CPU time and context switches per proxied request, per thread of the data plane and the mock,
# at a fixed request rate: the figure to compare two builds by (run it for each, alternating),
# since latency percentiles on a shared machine move more between runs than a change moves them.
#
#   ./e2e/bench-cpu.sh                         # target/release, 3,000 req/s for 10 s
#   ./e2e/bench-cpu.sh --bin-dir DIR --rate 2000 --seconds 20
#   ./e2e/bench-cpu.sh --bare                  # also bare_proxy (DIR/examples), same mock and
#                                              # rate, right after, and the ratio of the totals
#
# DIR needs sluice-control, sluice-proxy, sluice-mock, sluicectl and sluice-bench. Uses the ports
# of deploy/local/run.sh plus 10,000 (18080, 15051, 18081, 19090) and a temporary data dir.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release"
rate=3000
seconds=10
bare=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --bare) bare=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "bench-cpu: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
bin="$(cd "$bin" && pwd)"

run=""
data=""
bare_pid=""
cleanup() {
  kill $run $bare_pid 2>/dev/null || true
  wait $run $bare_pid 2>/dev/null || true
  [ -z "$data" ] || rm -rf "$data"
}
trap cleanup EXIT
# shellcheck source=e2e/bench-gateway.sh
. "$root/e2e/bench-gateway.sh"
start_gateway 18080 15051 18081 19090

# One line per thread: name, tid, context switches, CPU ticks (user + system).
threads() {
  for t in /proc/"$1"/task/*; do
    printf '%s %s %s %s\n' "$(cat "$t/comm")" "${t##*/}" \
      "$(awk '/^voluntary_ctxt/{v=$2} /^nonvoluntary_ctxt/{n=$2} END{print v+n}' "$t/status")" \
      "$(awk '{print $14+$15}' "$t/stat")"
  done | sort -k2
}
load() { # duration [url key]
  "$bin/sluice-bench" load --url "${2:-http://127.0.0.1:18080/v1}" --key "${3:-$key}" --model gpt-4o-mini \
    --rate "$rate" --duration "$1"
}

load 2s > /dev/null 2>&1 # warm-up: pools, caches
threads "$PROXY_PIDS" > "$data/proxy.before"
threads "$MOCK_PID" > "$data/mock.before"
load "${seconds}s" > "$data/load.out" 2>&1
threads "$PROXY_PIDS" > "$data/proxy.after"
threads "$MOCK_PID" > "$data/mock.after"

ticks=$(getconf CLK_TCK)
requests=$((rate * seconds))
report() { # name before after
  echo "$1 (per request)"
  printf '  %-18s %14s %12s\n' thread "switches" "CPU µs"
  join -1 2 -2 2 "$2" "$3" | awk -v r="$requests" -v hz="$ticks" '
    { cs = ($6 - $3) / r; us = ($7 - $4) * 1e6 / hz / r; tcs += cs; tus += us
      printf "  %-18s %14.3f %12.1f\n", $2, cs, us }
    END { printf "  %-18s %14.3f %12.1f\n", "total", tcs, tus }'
}
report "sluice-proxy" "$data/proxy.before" "$data/proxy.after" | tee "$data/proxy.report"
report "sluice-mock" "$data/mock.before" "$data/mock.after"
grep -E '^\| *[0-9]' "$data/load.out" || { cat "$data/load.out" >&2; exit 1; }
[ -n "$bare" ] || exit 0

# The floor: the bare proxy in front of the same mock, at the same rate.
"$bin/examples/bare_proxy" 127.0.0.1:18190 http://127.0.0.1:19090 > "$data/bare.log" 2>&1 &
bare_pid=$!
bare_url=http://127.0.0.1:18190/v1
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "$bare_url/models" 2>/dev/null && break
  sleep 0.1
done
load 2s "$bare_url" sk-bench > /dev/null 2>&1
threads "$bare_pid" > "$data/bare.before"
threads "$MOCK_PID" > "$data/mock.before"
load "${seconds}s" "$bare_url" sk-bench > "$data/load.out" 2>&1
threads "$bare_pid" > "$data/bare.after"
threads "$MOCK_PID" > "$data/mock.after"
report "bare_proxy" "$data/bare.before" "$data/bare.after" | tee "$data/bare.report"
report "sluice-mock" "$data/mock.before" "$data/mock.after"
grep -E '^\| *[0-9]' "$data/load.out" || { cat "$data/load.out" >&2; exit 1; }
total() { awk '$1 == "total" {print $3}' "$1"; }
awk -v s="$(total "$data/proxy.report")" -v b="$(total "$data/bare.report")" \
  'BEGIN { printf "CPU per request: sluice-proxy %.1f µs, bare_proxy %.1f µs, ratio %.2f\n", s, b, (b > 0 ? s / b : 0) }'
