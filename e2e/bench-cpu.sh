#!/usr/bin/env bash
# CPU time (user space and kernel) and context switches (all, and the involuntary ones: preemptions)
# per proxied request, per thread of the data plane and the mock,
# at a fixed request rate: the figure to compare two builds by (run it for each, alternating),
# since latency percentiles on a shared machine move more between runs than a change moves them.
#
#   ./e2e/bench-cpu.sh                         # target/release, 3,000 req/s for 10 s
#   ./e2e/bench-cpu.sh --bin-dir DIR --rate 2000 --seconds 20
#   ./e2e/bench-cpu.sh --bare                  # also bare_proxy (DIR/examples), same mock and
#                                              # rate, right after, and the ratio of the totals
#   ./e2e/bench-cpu.sh --bare --no-spool       # Sluice without its usage spool (what the spool
#                                              # costs: alternate with and without)
#   ./e2e/bench-cpu.sh --bare --saturate 32    # at saturation (32 connections, as
#                                              # bench-nginx.sh --hyper) instead of a rate: also
#                                              # the control plane's and the load generator's CPU
#                                              # per request, and the whole machine's, which on
#                                              # shared cores is what the throughput ratio follows
#   ./e2e/bench-cpu.sh --streams 1000 --bare   # CPU per relayed SSE event instead: rounds of
#                                              # 1,000 concurrent streams (--rounds 3) of a mock
#                                              # answering --chunks 40 content chunks, one every
#                                              # --chunk-interval 50ms (44 events a stream)
#   ./e2e/bench-cpu.sh --streams 1000 --bare --messages   # the same as Anthropic Messages
#                                              # streams passed through to an Anthropic backend
#                                              # (--chunks + 7 events a stream)
#   ./e2e/bench-cpu.sh --streams 1000 --bare --translated   # chat streams from that Anthropic
#                                              # backend, which Sluice translates (--chunks + 5
#                                              # events), against the bare proxy forwarding the
#                                              # mock's own chat stream (--chunks + 4)
#   ./e2e/bench-cpu.sh --bare --messages       # whole Messages requests passed through to that
#   ./e2e/bench-cpu.sh --bare --translated     # backend, or chat requests translated for it
#   ./e2e/bench-cpu.sh --streams 1000 --bare --messages-to-chat   # Messages streams to the mock
#                                              # as an OpenAI-format backend, which Sluice
#                                              # translates (--chunks + 5 events), against the
#                                              # bare proxy forwarding the mock's own Messages
#                                              # stream (--chunks + 7); whole ones without
#                                              # --streams
#   --agent (with --messages, --messages-to-chat or --translated): the request a coding agent
#                                              # sends mid-task instead of a short one (about
#                                              # 60 KB: a system prompt, sixteen tools, five
#                                              # rounds of tool calls and results; Messages in
#                                              # Claude Code's shape); whole requests only
#   ./e2e/bench-cpu.sh --streams 1000 --bare --messages-to-chat --tool-call   # the answers are
#                                              # tool calls, their arguments in --chunks pieces
#                                              # (--translated instead: for a chat client);
#                                              # without --streams, whole answers calling it
#
# DIR needs sluice-control, sluice-proxy, sluice-mock, sluicectl and sluice-bench. Uses the ports
# of deploy/local/run.sh plus 10,000 (18080, 15051, 18081, 19090; 19091 for the streams' mock)
# and a temporary data dir.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release"
rate=3000
seconds=10
bare=""
no_spool=()
streams=""
messages=""
translated=""
to_chat=""
agent=""
tool_call=""
saturate=""
rounds=3
chunks=40
chunk_interval=50ms
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --bare) bare=1; shift ;;
    --saturate) saturate=$2; shift 2 ;;
    --no-spool) no_spool=(--no-spool); shift ;;
    --streams) streams=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --chunks) chunks=$2; shift 2 ;;
    --chunk-interval) chunk_interval=$2; shift 2 ;;
    --messages) messages=1; shift ;;
    --translated) messages=1; translated=1; shift ;;
    --messages-to-chat) messages=1; to_chat=1; shift ;;
    --agent) agent=1; shift ;;
    --tool-call) tool_call=1; shift ;;
    -h|--help) sed -n '2,49p' "$0"; exit 0 ;;
    *) echo "bench-cpu: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
bin="$(cd "$bin" && pwd)"

run=""
data=""
bare_pid=""
stream_mock=""
cleanup() {
  kill $run $bare_pid $stream_mock 2>/dev/null || true
  wait $run $bare_pid $stream_mock 2>/dev/null || true
  [ -z "$data" ] || rm -rf "$data"
}
trap cleanup EXIT
# shellcheck source=e2e/bench-gateway.sh
. "$root/e2e/bench-gateway.sh"
start_gateway 18080 15051 18081 19090 "${no_spool[@]}"

# One line per thread: name, tid, voluntary and involuntary context switches, CPU ticks in user
# space and in the kernel.
threads() {
  for t in /proc/"$1"/task/*; do
    printf '%s %s %s %s\n' "$(cat "$t/comm")" "${t##*/}" \
      "$(awk '/^voluntary_ctxt/{v=$2} /^nonvoluntary_ctxt/{n=$2} END{print v, n}' "$t/status")" \
      "$(awk '{print $14, $15}' "$t/stat")"
  done | sort -k2
}
model=gpt-4o-mini
mock_pid=$MOCK_PID
mock_url=http://127.0.0.1:19090
# Events a stream delivers: the role chunk, the content chunks, finish, usage and [DONE]; for
# Messages message_start, ping, content_block_start, the mock's name and the content deltas,
# content_block_stop, message_delta and message_stop.
events=$((chunks + 4))
if [ -n "$streams" ] || [ -n "$messages" ]; then
  # A mock of its own for the streams, served to Sluice as one more backend (an Anthropic one
  # for --messages); whole answers (no --streams) are the mock's default five words.
  mock_url=http://127.0.0.1:19091
  pace=()
  [ -z "$streams" ] || pace=(--chunk-count "$chunks" --tool-call-pieces "$chunks" --chunk-interval "$chunk_interval")
  "$bin/sluice-mock" --listen 127.0.0.1:19091 --name stream-mock --model bench-stream \
    "${pace[@]}" 2> "$data/stream-mock.log" &
  stream_mock=$!
  mock_pid=$stream_mock
  model=bench-stream
  api=()
  probe=(/v1/chat/completions '{"model":"bench-stream","messages":[{"role":"user","content":"hi"}]}')
  if [ -n "$messages" ]; then
    [ -n "$to_chat" ] || api=(--api-format anthropic --api-key-env BENCH_CLAUDE_KEY)
    probe=(/v1/messages '{"model":"bench-stream","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}')
    events=$((chunks + 7))
  fi
  if [ -n "$translated" ]; then
    # Chat from the Anthropic backend: the role chunk, the mock's name and the content
    # chunks, finish, usage, [DONE]; the bare proxy forwards the mock's own chat stream.
    probe=(/v1/chat/completions '{"model":"bench-stream","messages":[{"role":"user","content":"hi"}]}')
    events=$((chunks + 5))
  fi
  # Messages translated from the mock's chat stream: message_start, content_block_start, the
  # content deltas, content_block_stop, message_delta, message_stop.
  [ -z "$to_chat" ] || events=$((chunks + 5))
  BENCH_CLAUDE_KEY=sk-ant-bench SLUICE_ENDPOINT=http://127.0.0.1:15051 \
    SLUICE_ADMIN_TOKEN=$(cat "$data/admin-token") \
    "$bin/sluicectl" backend add --name stream-mock --base-url "$mock_url/v1" \
    --model bench-stream "${api[@]}" > /dev/null
  for _ in $(seq 1 100); do # until the data plane's snapshot routes the model
    curl -fsS -o /dev/null -H "authorization: Bearer $key" -H 'content-type: application/json' \
      -H 'anthropic-version: 2023-06-01' -d "${probe[1]}" \
      "http://127.0.0.1:18080${probe[0]}" 2>/dev/null && break
    sleep 0.1
  done
fi
# What the load speaks: Messages for --messages, chat for --translated and the default.
client_api=()
[ -z "$messages" ] || [ -n "$translated" ] || client_api=(--messages)
if [ -n "$agent" ]; then
  [ -n "$messages" ] && [ -z "$streams" ] \
    || { echo "$(basename "$0" .sh): --agent needs --messages, --messages-to-chat or --translated, without --streams" >&2; exit 2; }
  client_api+=(--agent)
fi
if [ -n "$tool_call" ]; then
  [ -n "$to_chat$translated" ] \
    || { echo "bench-cpu: --tool-call needs --messages-to-chat or --translated" >&2; exit 2; }
  client_api+=(--tool-call)
fi
load() { # duration [url key]
  if [ -n "$streams" ]; then
    local n=$rounds
    [ "$1" != warm-up ] || n=1
    "$bin/sluice-bench" load --url "${2:-http://127.0.0.1:18080/v1}" --key "${3:-$key}" --model "$model" \
      --stream --streams "$streams" --rounds "$n" --expected-events "$events" "${client_api[@]}"
  else
    local duration=$1 pace=(--rate "$rate")
    [ "$1" != warm-up ] || duration=2s
    [ -z "$saturate" ] || pace=(--saturate --connections "$saturate")
    "$bin/sluice-bench" load --url "${2:-http://127.0.0.1:18080/v1}" --key "${3:-$key}" --model "$model" \
      "${pace[@]}" --duration "$duration" "${client_api[@]}"
  fi
}
# What one measured load delivered: requests, or SSE events received (checked against what
# every stream should have sent: a lost event fails the run).
delivered() { # load output
  if [ -n "$streams" ]; then
    awk -F'|' '$2 ~ /127\.0\.0\.1/ { split($4, e, "/"); got = e[1] + 0; want = e[2] + 0 }
      END { if (got == 0 || got != want) exit 1; print got }' "$1"
  elif [ -n "$saturate" ]; then
    # The saturation table's row: path, connections, requests, errors, req/s, ...
    awk -F'|' '$2 ~ /127\.0\.0\.1/ { n = $4 + 0; errors = $5 + 0 }
      END { if (n == 0 || errors != 0) exit 1; print n }' "$1"
  else
    grep -qE '^\| *[0-9]' "$1" && echo $((rate * seconds))
  fi
}
unit=request
[ -z "$streams" ] || unit=event
measure() { # name pid url key
  load warm-up "${3:-}" "${4:-}" > /dev/null 2>&1 # pools, caches
  threads "$2" > "$data/$1.before"
  threads "$mock_pid" > "$data/mock.before"
  threads "$CONTROL_PID" > "$data/control.before"
  # The load generator's own CPU: bash's `time` of the command, user and system seconds.
  local TIMEFORMAT='%U %S'
  { time load "${seconds}s" "${3:-}" "${4:-}" > "$data/load.out" 2>&1; } 2> "$data/load.time"
  threads "$2" > "$data/$1.after"
  threads "$mock_pid" > "$data/mock.after"
  threads "$CONTROL_PID" > "$data/control.after"
  grep -E '^\| *[0-9]|^\| *(http|127)' "$data/load.out" || true
  n=$(delivered "$data/load.out") || { echo "bench-cpu: the load did not deliver everything:" >&2; cat "$data/load.out" >&2; exit 1; }
  report "$1" "$data/$1.before" "$data/$1.after" "$n" | tee "$data/$1.report"
  report "sluice-mock" "$data/mock.before" "$data/mock.after" "$n" | tee "$data/$1.mock"
  [ -n "$saturate" ] || return 0
  # At saturation the cores are shared by every process: what each costs a request.
  report "sluice-control" "$data/control.before" "$data/control.after" "$n" | tail -1 > "$data/$1.control"
  local proxy mock control generator
  proxy=$(total "$data/$1.report")
  mock=$(total "$data/$1.mock")
  control=$(total "$data/$1.control")
  generator=$(awk -v n="$n" '{ printf "%.2f", ($1 + $2) * 1e6 / n }' "$data/load.time")
  awk -v p="$proxy" -v m="$mock" -v g="$generator" -v c="$control" \
    'BEGIN { printf "%.2f\n", p + m + g + c }' > "$data/$1.machine"
  echo "whole machine (per $unit, $1's run): $1 $proxy, mock $mock, load generator $generator," \
    "control plane $control = $(cat "$data/$1.machine") µs"
}

ticks=$(getconf CLK_TCK)
total() { awk '$1 == "total" {print $4}' "$1"; }
# Switches are voluntary (the thread waited) plus involuntary (the scheduler preempted it while it
# could run); the split of CPU time between user space and the kernel is the kernel's sampling at
# each clock tick, so only its sum over many requests means anything.
report() { # name before after delivered
  echo "$1 (per $unit)"
  printf '  %-18s %10s %12s %10s %8s %8s\n' thread switches involuntary "CPU µs" user kernel
  # Joined on the tid: $2-$6 before (name, voluntary, involuntary, user, kernel), $7-$11 after.
  join -1 2 -2 2 "$2" "$3" | awk -v r="$4" -v hz="$ticks" '
    BEGIN { f = 1e6 / hz }
    { inv = ($9 - $4) / r; cs = ($8 - $3) / r + inv; us = ($10 - $5) * f / r; ks = ($11 - $6) * f / r
      printf "  %-18s %10.3f %12.3f %10.2f %8.2f %8.2f\n", $2, cs, inv, us + ks, us, ks
      t[1] += cs; t[2] += inv; t[3] += us + ks; t[4] += us; t[5] += ks }
    END { printf "  %-18s %10.3f %12.3f %10.2f %8.2f %8.2f\n", "total", t[1], t[2], t[3], t[4], t[5] }'
}
measure sluice-proxy "$PROXY_PIDS"
[ -n "$bare" ] || exit 0

# The floor: the bare proxy in front of the same mock, at the same rate.
"$bin/examples/bare_proxy" 127.0.0.1:18190 "$mock_url" > "$data/bare.log" 2>&1 &
bare_pid=$!
bare_url=http://127.0.0.1:18190/v1
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "$bare_url/models" 2>/dev/null && break
  sleep 0.1
done
[ -z "$translated" ] || events=$((chunks + 4))
# A tool call's chat stream has a chunk more than a text's (the call's start).
[ -z "$translated" ] || [ -z "$tool_call" ] || events=$((chunks + 5))
[ -z "$to_chat" ] || events=$((chunks + 7))
measure bare_proxy "$bare_pid" "$bare_url" sk-bench
if [ -n "$saturate" ]; then
  # The throughput ratio follows the whole machine's CPU a request, not the proxy's alone.
  awk -v s="$(cat "$data/sluice-proxy.machine")" -v b="$(cat "$data/bare_proxy.machine")" \
    'BEGIN { printf "whole machine per request: Sluice'"'"'s run %.2f µs, the bare proxy'"'"'s %.2f µs, ratio %.2f (throughput ratio about %.2f)\n", s, b, s / b, b / s }'
fi
awk -v s="$(total "$data/sluice-proxy.report")" -v b="$(total "$data/bare_proxy.report")" -v u="$unit" \
  'BEGIN { printf "CPU per %s: sluice-proxy %.2f µs, bare_proxy %.2f µs, ratio %.2f\n", u, s, b, (b > 0 ? s / b : 0) }'
