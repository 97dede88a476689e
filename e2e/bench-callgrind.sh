#!/usr/bin/env bash
# Instructions per proxied request, Sluice's data plane against the bare proxy
# (data-plane/examples/bare_proxy.rs), counted by valgrind's callgrind: the figure to develop the
# hot path by on a shared machine, where wall-clock and CPU-time figures move with the
# neighbours' load and these do not (within about 2 %). Each proxy runs under callgrind in front
# of the same mock (deploy/local/run.sh: control plane, mock, and Sluice with every feature on,
# its log line at info written to a file); after a warm-up the counters are zeroed, one
# connection (or --connections N) sends requests back to back for the duration, and the
# counters are dumped, so start-up and idle time do not count. Sluice runs with its usage spool (a data dir), as
# deploy/local/run.sh and ./e2e/bench-cpu.sh run it; --no-spool leaves it out. It prints both
# figures, their ratio, and each profile's most expensive functions (self cost per request).
# Kernel time is not counted: compare CPU time with ./e2e/bench-cpu.sh --bare.
#
#   ./e2e/bench-callgrind.sh                   # target/release, 10 s each, top 25 functions
#   ./e2e/bench-callgrind.sh --bin-dir DIR --seconds 20 --top 40 --keep OUT   # keeps OUT.*.cg
#   ./e2e/bench-callgrind.sh --no-spool        # Sluice without its usage spool
#   ./e2e/bench-callgrind.sh --connections 32  # at saturation: requests share wake-ups and writes
#   ./e2e/bench-callgrind.sh --tpm 1000000000  # the key and the backend with a TPM limit (never
#                                              # reached here): what the token checks cost
#   ./e2e/bench-callgrind.sh --streams 20       # instructions per relayed SSE event instead: 5
#                                              # rounds (--rounds) of 20 concurrent streams of a
#                                              # mock's 40 content chunks, one every 50 ms (44
#                                              # events a stream, the usage chunk included)
#   ./e2e/bench-callgrind.sh --messages        # Anthropic Messages (non-streamed) to an Anthropic
#                                              # backend, which Sluice passes through
#   ./e2e/bench-callgrind.sh --streams 20 --messages   # the same streamed: per relayed event
#                                              # (47 a stream, 41 of them content deltas)
#   ./e2e/bench-callgrind.sh --translated      # chat requests to that Anthropic backend,
#                                              # which Sluice translates, against the bare
#                                              # proxy forwarding chat to the same mock; with
#                                              # --streams 20, chat streams translated event by
#                                              # event (45 events a stream; the bare proxy's 44)
#   ./e2e/bench-callgrind.sh --messages-to-chat  # Anthropic Messages to an OpenAI-format backend
#                                              # (the same mock, registered as one), which
#                                              # Sluice translates, against the bare proxy
#                                              # forwarding the Messages to the mock's own
#                                              # /v1/messages; with --streams 20, event by event
#                                              # (45 events a stream; the bare proxy's 47)
#   --agent (with --messages, --messages-to-chat or --translated): the request a coding agent
#                                              # sends mid-task instead of a short one (about
#                                              # 60 KB: a system prompt, sixteen tools, five
#                                              # rounds of tool calls and results; Messages in
#                                              # Claude Code's shape); whole requests only
#   ./e2e/bench-callgrind.sh --streams 20 --messages-to-chat --tool-call   # the answers are
#                                              # tool calls instead, their arguments in 40
#                                              # pieces (45 events a stream; the bare proxy's
#                                              # 47): what an agent's streamed calls cost; with
#                                              # --translated instead, for a chat client (45);
#                                              # without --streams, whole answers calling it
#   ./e2e/bench-callgrind.sh --cache           # also simulate the caches (--cache-sim=yes, about
#                                              # twice as slow) and print first-level
#                                              # instruction and data misses per request beside
#                                              # the instructions: how much code and data a
#                                              # request touches, which instruction counts miss
#
# DIR needs sluice-control, sluice-proxy, sluice-mock, sluicectl, sluice-bench and
# examples/bare_proxy, built as shipped in two invocations (`cargo build --release --bins`, then
# `cargo build --release -p sluice-proxy --example bare_proxy`; see warn_unless_shipped). Uses ports 28080-28091, 25051 and 29090 (and 29091 for the streams' or the Messages' mock).
# Needs valgrind and python3.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release"
seconds=10
top=25
keep=""
spool=1
connections=1
tpm=""
streams=""
messages=""
translated=""
to_chat=""
agent=""
tool_call=""
rounds=5
cache=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --top) top=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    --no-spool) spool=""; shift ;;
    --connections) connections=$2; shift 2 ;;
    --tpm) tpm=$2; shift 2 ;;
    --streams) streams=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --messages) messages=1; shift ;;
    --translated) messages=1; translated=1; shift ;;
    --messages-to-chat) messages=1; to_chat=1; shift ;;
    --agent) agent=1; shift ;;
    --tool-call) tool_call=1; shift ;;
    --cache) cache=1; shift ;;
    -h|--help) sed -n '2,59p' "$0"; exit 0 ;;
    *) echo "bench-callgrind: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
bin="$(cd "$bin" && pwd)"
command -v valgrind >/dev/null || { echo "bench-callgrind: valgrind not found (apt-get install -y valgrind)" >&2; exit 1; }

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
start_gateway 28080 25051 28081 29090
out=${keep:-$data/profile}
ctl() { SLUICE_ENDPOINT=http://127.0.0.1:25051 SLUICE_ADMIN_TOKEN=$(cat "$data/admin-token") "$bin/sluicectl" "$@"; }
if [ -n "$tpm" ]; then
  key_id=$(ctl -o json key list | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientKeys"][0]["id"])')
  ctl key update "$key_id" --tpm-limit "$tpm" > /dev/null
  ctl backend update demo-mock --tpm-limit "$tpm" > /dev/null
fi

model=gpt-4o-mini
mock_url=http://127.0.0.1:29090
unit=request
events=44 # a chat stream: the role chunk, 40 content chunks, finish, usage, [DONE]
# The Messages mock as an Anthropic backend, or (--messages-to-chat) as an OpenAI-format one.
anthropic=(--api-format anthropic --api-key-env BENCH_CLAUDE_KEY)
[ -z "$to_chat" ] || anthropic=()
if [ -n "$streams" ] && [ -n "$messages" ]; then
  # The same for Anthropic's Messages, passed through to an Anthropic backend: message_start,
  # ping, content_block_start, 41 deltas (the mock's name and 40 words), content_block_stop,
  # message_delta, message_stop.
  mock_url=http://127.0.0.1:29091
  model=bench-claude
  unit=event
  events=47
  "$bin/sluice-mock" --listen 127.0.0.1:29091 --name claude-mock --model bench-claude \
    --chunk-count 40 --tool-call-pieces 40 --chunk-interval 50ms 2> "$data/claude-mock.log" &
  pids+=($!)
  BENCH_CLAUDE_KEY=sk-ant-bench ctl backend add --name claude-mock --base-url "$mock_url/v1" \
    --model bench-claude "${anthropic[@]}" > /dev/null
elif [ -n "$streams" ]; then
  # A mock of its own for the streams, served to Sluice as one more backend.
  mock_url=http://127.0.0.1:29091
  model=bench-stream
  unit=event
  "$bin/sluice-mock" --listen 127.0.0.1:29091 --name stream-mock --model bench-stream \
    --chunk-count 40 --chunk-interval 50ms 2> "$data/stream-mock.log" &
  pids+=($!)
  ctl backend add --name stream-mock --base-url "$mock_url/v1" --model bench-stream > /dev/null
elif [ -n "$messages" ]; then
  # A mock of its own answering Messages, served to Sluice as an Anthropic backend (its key:
  # any, the mock checks none).
  mock_url=http://127.0.0.1:29091
  model=bench-claude
  "$bin/sluice-mock" --listen 127.0.0.1:29091 --name claude-mock --model bench-claude \
    2> "$data/claude-mock.log" &
  pids+=($!)
  BENCH_CLAUDE_KEY=sk-ant-bench ctl backend add --name claude-mock --base-url "$mock_url/v1" \
    --model bench-claude "${anthropic[@]}" > /dev/null
fi

wait_http() { # url
  for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "bench-callgrind: $1 did not answer" >&2
  exit 1
}
SLUICE_DATAPLANE_TOKEN=$(cat "$data/dataplane-token") RUST_LOG=${RUST_LOG:-info} \
  valgrind --tool=callgrind ${cache:+--cache-sim=yes} --callgrind-out-file="$out.sluice.cg" \
  "$bin/sluice-proxy" --control-plane http://127.0.0.1:25051 --listen 127.0.0.1:28090 \
  --node-id callgrind ${spool:+--data-dir "$data/callgrind-proxy"} 2> "$data/sluice.log" &
pids+=($!)
sluice=$!
valgrind --tool=callgrind ${cache:+--cache-sim=yes} --callgrind-out-file="$out.bare.cg" \
  "$bin/examples/bare_proxy" 127.0.0.1:28091 "$mock_url" 2> "$data/bare.log" &
pids+=($!)
bare=$!
wait_http http://127.0.0.1:28090/readyz
wait_http http://127.0.0.1:28091/v1/models

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
    || { echo "bench-callgrind: --tool-call needs --messages-to-chat or --translated" >&2; exit 2; }
  client_api+=(--tool-call)
fi
drive() { # port duration|warm-up
  if [ -n "$streams" ]; then
    local n=$rounds
    [ "$2" != warm-up ] || n=1
    "$bin/sluice-bench" load --url "http://127.0.0.1:$1/v1" --key "$key" --model "$model" \
      --stream --streams "$streams" --rounds "$n" --expected-events "$events" --timeout 120s \
      "${client_api[@]}"
  else
    local duration=$2
    [ "$2" != warm-up ] || duration=3s
    "$bin/sluice-bench" load --url "http://127.0.0.1:$1/v1" --key "$key" --model "$model" \
      --saturate --connections "$connections" --duration "$duration" --warmup 0s --segments 1 --timeout 30s \
      "${client_api[@]}"
  fi
}
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
# With --translated the two sides deliver different streams: Sluice a chat stream translated
# from the Anthropic one (the role chunk, 41 content chunks, finish, usage, [DONE]), the bare
# proxy the mock's own chat stream.
sluice_events=$events bare_events=$events
[ -z "$translated" ] || { sluice_events=45; bare_events=44; }
# A tool call's chat stream has a chunk more than a text's (the call's start).
[ -z "$translated" ] || [ -z "$tool_call" ] || bare_events=45
# With --messages-to-chat, Sluice's Messages stream is translated from the mock's chat stream.
[ -z "$to_chat" ] || sluice_events=45
for side in "sluice 28090 $sluice $sluice_events" "bare 28091 $bare $bare_events"; do
  read -r name port pid side_events <<< "$side"
  events=$side_events
  drive "$port" warm-up > "$data/$name.warm-up" 2>&1 || { cat "$data/$name.warm-up" >&2; exit 1; }
  callgrind_control --zero "$pid" > /dev/null 2>&1
  drive "$port" "${seconds}s" > "$data/$name.load" 2>&1 || { cat "$data/$name.load" >&2; exit 1; }
  callgrind_control --dump "$pid" > /dev/null 2>&1
  if [ -n "$streams" ]; then
    # The events: `received / expected` in the streams table, all of them or the run fails.
    awk -F'|' '/127\.0\.0\.1/ { split($4, e, "/"); got = e[1] + 0; want = e[2] + 0 }
      END { if (got == 0 || got != want) exit 1; print got }' "$data/$name.load" > "$data/$name.requests" \
      || { echo "bench-callgrind: $name lost events:" >&2; cat "$data/$name.load" >&2; exit 1; }
  else
    # The request count: the `requests` column of the saturation table.
    grep -E '127\.0\.0\.1' "$data/$name.load" | head -1 | awk -F'|' '{gsub(/ /, "", $4); print $4}' > "$data/$name.requests"
  fi
done

python3 - "$out" "$top" "$data/sluice.requests" "$data/bare.requests" "$unit" <<'PY'
import collections, re, sys
out, top = sys.argv[1], int(sys.argv[2])
requests = {"sluice": int(open(sys.argv[3]).read()), "bare": int(open(sys.argv[4]).read())}
unit = sys.argv[5]

def profile(path):
    """Self cost per function and event of a callgrind dump (cost lines after `calls=` are a
    callee's): {event: Counter}. Events are named by the dump's `events:` line (Ir alone, or
    Ir and the cache simulation's misses with --cache)."""
    names, fn, call = {}, None, False
    events, cost = ["Ir"], None
    for line in open(path, errors="replace"):
        if line.startswith("events:"):
            events = line.split()[1:]
            cost = {e: collections.Counter() for e in events}
        elif line.startswith(("fn=", "cfn=")):
            # Names are numbered where they first appear, as a function or as a callee.
            text = line.split("=", 1)[1].rstrip("\n")
            m = re.match(r"\((\d+)\)(?: (.*))?", text)
            if m and m.group(2) is not None:
                names[m.group(1)] = m.group(2)
            if line.startswith("fn="):
                fn = names.get(m.group(1)) if m else text
        elif line.startswith("calls="):
            call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if not call:
                # A position column, then one per event; trailing zeros may be left out.
                values = line.split()[1:]
                for event, value in zip(events, values):
                    cost[event][fn] += int(value)
            call = False
    return cost

per, misses = {}, {}
for name in ("sluice", "bare"):
    costs = profile(f"{out}.{name}.cg.1")
    cost = costs["Ir"]
    n = requests[name]
    per[name] = sum(cost.values()) / n
    print(f"\n{name}: {n} {unit}s, {per[name]:,.0f} instructions per {unit}; top {top} (self):")
    for fn, c in cost.most_common(top):
        print(f"  {c / n:9,.0f}  {(fn or '?')[:150]}")
    if "I1mr" in costs:
        misses[name] = {
            "instruction": sum(costs["I1mr"].values()) / n,
            "data": (sum(costs["D1mr"].values()) + sum(costs["D1mw"].values())) / n,
        }
        print(f"\n{name}: first-level instruction-cache misses per {unit}: "
              f"{misses[name]['instruction']:,.0f}; top {top} (self):")
        for fn, c in costs["I1mr"].most_common(top):
            print(f"  {c / n:9,.1f}  {(fn or '?')[:150]}")
print(f"\ninstructions per {unit}: sluice-proxy {per['sluice']:,.0f}, bare_proxy {per['bare']:,.0f}, "
      f"ratio {per['sluice'] / per['bare']:.2f}")
for kind in ("instruction", "data") if misses else ():
    s, b = misses["sluice"][kind], misses["bare"][kind]
    print(f"first-level {kind}-cache misses per {unit}: sluice-proxy {s:,.0f}, bare_proxy {b:,.0f}, "
          f"ratio {s / b:.2f}")
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
