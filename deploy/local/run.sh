#!/usr/bin/env bash
# Starts a working Sluice gateway on this machine, offline:
#   - sluice-control on its embedded SQLite (secrets generated into the data directory),
#   - the bundled mock OpenAI provider as a demo backend (unless --no-demo),
#   - N sluice-proxy data planes; with N > 1, nginx in front of them,
# then prints a client key and a curl that works. Ctrl-C (or SIGTERM) stops everything: nginx,
# then the data planes (their usage reported to the control plane, still up), then the rest.
# Each runs in a session of its own (setsid), so that a Ctrl-C reaches only this script, which
# stops them in that order.
#
#   deploy/local/run.sh                    # 1 data plane on http://127.0.0.1:8080
#   deploy/local/run.sh --replicas 3       # 3 data planes behind nginx on :8080
#
# Options (and environment):
#   --replicas N      data planes (SLUICE_REPLICAS, 1)
#   --port P          the port clients use: nginx's, or the single data plane's (SLUICE_PORT, 8080)
#   --grpc-port P     control plane gRPC (SLUICE_GRPC_PORT, 50051)
#   --http-port P     control plane dashboard, health, metrics (SLUICE_HTTP_PORT, 8081)
#   --mock-port P     demo backend (SLUICE_MOCK_PORT, 9090)
#   --data-dir DIR    control plane data (SLUICE_DATA_DIR, ./sluice-data); data plane i keeps its
#                     usage spool in DIR/proxy-i, so a replica restarted there resends its usage
#   --profile P       cargo profile to build and run: release or debug (SLUICE_BUILD_PROFILE, release)
#   --no-spool        data planes without a usage spool (no crash recovery of usage: for
#                     measuring what the spool costs, ./e2e/bench-cpu.sh --no-spool)
#   --no-demo         no mock backend and no client key
#   --no-build        run existing binaries (with --bin-dir DIR, default target/PROFILE)
#   (SLUICE_NGINX_READ_TIMEOUT: nginx's proxy_read_timeout, 660s; shorter, as a cloud load
#   balancer's 60 s, to see that a thinking model's stream is kept alive through it)
# While it runs, DATA_DIR/run/cluster.env lists the ports and process ids (tests read it).
set -euo pipefail
cd "$(dirname "$0")/../.."

REPLICAS=${SLUICE_REPLICAS:-1}
PORT=${SLUICE_PORT:-8080}
GRPC_PORT=${SLUICE_GRPC_PORT:-50051}
HTTP_PORT=${SLUICE_HTTP_PORT:-8081}
MOCK_PORT=${SLUICE_MOCK_PORT:-9090}
DATA_DIR=${SLUICE_DATA_DIR:-./sluice-data}
PROFILE=${SLUICE_BUILD_PROFILE:-release}
NGINX_READ_TIMEOUT=${SLUICE_NGINX_READ_TIMEOUT:-660s}
DEMO=1
BUILD=1
SPOOL=1
BIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) REPLICAS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --grpc-port) GRPC_PORT=$2; shift 2 ;;
    --http-port) HTTP_PORT=$2; shift 2 ;;
    --mock-port) MOCK_PORT=$2; shift 2 ;;
    --data-dir) DATA_DIR=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --no-demo) DEMO=0; shift ;;
    --no-spool) SPOOL=0; shift ;;
    --no-build) BUILD=0; shift ;;
    --bin-dir) BIN=$2; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$BUILD" = 1 ]; then
  echo "building ($PROFILE) ..."
  if [ "$PROFILE" = release ]; then cargo build --release --quiet --bins; else cargo build --quiet --bins; fi
fi
BIN=${BIN:-target/$PROFILE}
mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)
RUN_DIR="$DATA_DIR/run"
mkdir -p "$RUN_DIR"
chmod 755 "$RUN_DIR"

pids=()
proxy_pids=()
NGINX_PID=""
# Every server starts as `$SETSID server … &`: setsid (util-linux) gives it a session and
# process group of its own, so a terminal's Ctrl-C, sent to this script's whole process
# group, does not stop them all at once (the control plane with the data planes, which then
# each wait --usage-flush-timeout for acks that cannot come) but only through cleanup below.
# setsid execs in place (a background child leads no group), so $! is the server's pid.
SETSID=$(command -v setsid || true)
[ -n "$SETSID" ] || echo "run.sh: no setsid (util-linux): Ctrl-C will stop the servers all at once; stop with kill $$ instead" >&2
# SIGTERM to each of the given processes, then waits for them all.
stop() {
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}
# Front to back: nginx stops taking requests; the data planes finish theirs (the mock still
# answering) and report their usage to the control plane, still up, so that nothing is left
# in their spools (stopped together, each waited --usage-flush-timeout, 10 s, for acks that
# could not come); then the rest.
cleanup() {
  # A second Ctrl-C while stopping is ignored: it would end this script and leave the servers,
  # in sessions of their own, running. The stop is bounded by the data planes' drain and
  # usage-flush timeouts.
  trap - EXIT
  trap '' INT TERM HUP
  [ -z "$NGINX_PID" ] || stop "$NGINX_PID"
  stop "${proxy_pids[@]}"
  stop "${pids[@]}"
  rm -f "$RUN_DIR/cluster.env"
}
trap cleanup EXIT
trap 'exit 0' INT TERM HUP

wait_http() { # url
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1; logs are in $RUN_DIR" >&2
  exit 1
}

$SETSID "$BIN/sluice-control" --data-dir "$DATA_DIR" \
  --grpc-listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
  2>"$RUN_DIR/control.log" &
pids+=($!)
CONTROL_PID=$!
wait_http "http://127.0.0.1:$HTTP_PORT/healthz"

export SLUICE_ENDPOINT="http://127.0.0.1:$GRPC_PORT"
export SLUICE_ADMIN_TOKEN=${SLUICE_ADMIN_TOKEN:-$(cat "$DATA_DIR/admin-token")}
DATAPLANE_TOKEN=${SLUICE_DATAPLANE_TOKEN:-$(cat "$DATA_DIR/dataplane-token")}

CLIENT_KEY=""
MOCK_PID=""
if [ "$DEMO" = 1 ]; then
  $SETSID "$BIN/sluice-mock" --listen "127.0.0.1:$MOCK_PORT" --name demo-mock \
    --model gpt-4o-mini,text-embedding-3-small,gpt-3.5-turbo-instruct \
    --chunk-interval 20ms 2>"$RUN_DIR/mock.log" &
  pids+=($!)
  MOCK_PID=$!
  wait_http "http://127.0.0.1:$MOCK_PORT/v1/models"
  if ! "$BIN/sluicectl" backend get demo-mock >/dev/null 2>&1; then
    "$BIN/sluicectl" backend add --name demo-mock --base-url "http://127.0.0.1:$MOCK_PORT/v1" \
      --pool primary --priority 10 \
      --model gpt-4o-mini:gpt-4o-mini:0.15:0.60 \
      --model text-embedding-3-small:text-embedding-3-small:0.02:0 \
      --model gpt-3.5-turbo-instruct:gpt-3.5-turbo-instruct:1.50:2.00 >/dev/null
  fi
  CLIENT_KEY=$("$BIN/sluicectl" -o json key create --name "local-$(date +%s)-$$" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
fi

# Whether a data plane listens is read from its `http listening on` line, an info line: kept
# whatever RUST_LOG the caller set (RUST_LOG=warn would have hidden it).
proxy_log=()
[ -z "${RUST_LOG:-}" ] || proxy_log=(env "RUST_LOG=$RUST_LOG,sluice_proxy::server=info")
proxy_ports=()
for i in $(seq 1 "$REPLICAS"); do
  if [ "$REPLICAS" = 1 ]; then p=$PORT; else p=$((PORT + 10 + i)); fi
  spool=(--data-dir "$DATA_DIR/proxy-$i")
  [ "$SPOOL" = 1 ] || spool=()
  SLUICE_DATAPLANE_TOKEN=$DATAPLANE_TOKEN $SETSID "${proxy_log[@]}" "$BIN/sluice-proxy" \
    --control-plane "$SLUICE_ENDPOINT" --listen "127.0.0.1:$p" --node-id "local-$i" \
    "${spool[@]}" 2>"$RUN_DIR/proxy-$i.log" &
  pids+=($!)
  proxy_pids+=($!)
  proxy_ports+=("$p")
done
# Each data plane must say it listens on its own port before its /readyz counts: another
# process holding that port would answer for it while it failed to bind.
for i in $(seq 1 "$REPLICAS"); do
  pid=${proxy_pids[$((i - 1))]} p=${proxy_ports[$((i - 1))]} log="$RUN_DIR/proxy-$i.log"
  for _ in $(seq 1 300); do
    grep -q "http listening on 127.0.0.1:$p" "$log" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { echo "data plane $i exited: $(tail -n 3 "$log")" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "http listening on 127.0.0.1:$p" "$log" 2>/dev/null \
    || { echo "data plane $i did not listen on port $p; logs are in $RUN_DIR" >&2; exit 1; }
  wait_http "http://127.0.0.1:$p/readyz"
done

NGINX_PID=""
if [ "$REPLICAS" -gt 1 ]; then
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  [ -x "$NGINX" ] || { echo "nginx is needed for --replicas > 1 (apt-get install nginx)" >&2; exit 1; }
  NGINX_DIR="$RUN_DIR/nginx"
  mkdir -p "$NGINX_DIR/logs" "$NGINX_DIR/tmp"
  chmod -R 777 "$NGINX_DIR/tmp"
  servers=""
  for p in "${proxy_ports[@]}"; do servers+="        server 127.0.0.1:$p max_fails=1 fail_timeout=2s;"$'\n'; done
  # The settings of deploy/nginx.conf, with local ports and paths.
  cat >"$NGINX_DIR/nginx.conf" <<CONF
worker_processes 1;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/logs/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $NGINX_DIR/tmp/body;
    proxy_temp_path $NGINX_DIR/tmp/proxy;
    fastcgi_temp_path $NGINX_DIR/tmp/fastcgi;
    uwsgi_temp_path $NGINX_DIR/tmp/uwsgi;
    scgi_temp_path $NGINX_DIR/tmp/scgi;
    upstream sluice_data_planes {
        least_conn;
$servers        keepalive 256;
        keepalive_timeout 20s;
    }
    server {
        listen 127.0.0.1:$PORT;
        client_max_body_size 17m;
        client_body_buffer_size 16m;
        if (\$http_upgrade ~* "^websocket\$") {
            return 426 '{"error":{"message":"This gateway does not take WebSocket connections; use HTTP.","type":"invalid_request_error","param":null,"code":"websocket_not_supported"}}';
        }
        location = /metrics {
            return 404 '{"error":{"message":"Not found.","type":"invalid_request_error","param":null,"code":"not_found"}}';
        }
        location / {
            proxy_pass http://sluice_data_planes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_connect_timeout 2s;
            proxy_read_timeout $NGINX_READ_TIMEOUT;
            proxy_send_timeout 660s;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 3;
        }
    }
}
CONF
  $SETSID "$NGINX" -p "$NGINX_DIR" -c "$NGINX_DIR/nginx.conf" -g 'daemon off;' 2>"$NGINX_DIR/logs/stderr.log" &
  pids+=($!)
  NGINX_PID=$!
  wait_http "http://127.0.0.1:$PORT/readyz"
fi

cat >"$RUN_DIR/cluster.env" <<ENV
PORT=$PORT
GRPC_PORT=$GRPC_PORT
HTTP_PORT=$HTTP_PORT
MOCK_PORT=$MOCK_PORT
CONTROL_PID=$CONTROL_PID
MOCK_PID=$MOCK_PID
NGINX_PID=$NGINX_PID
PROXY_PORTS="${proxy_ports[*]}"
PROXY_PIDS="${proxy_pids[*]}"
ENV

if [ -f "$DATA_DIR/admin-token" ]; then token_hint="cat $DATA_DIR/admin-token"; else token_hint="the SLUICE_ADMIN_TOKEN you set"; fi
if [ "$REPLICAS" -gt 1 ]; then front="nginx → $REPLICAS data planes (ports ${proxy_ports[*]})"; else front="data plane"; fi
cat <<TXT

Sluice is running (logs in $RUN_DIR):
  gateway        http://127.0.0.1:$PORT/v1   ($front, OpenAI-compatible)
  control plane  $SLUICE_ENDPOINT (gRPC), http://127.0.0.1:$HTTP_PORT (health, metrics)
  dashboard      http://127.0.0.1:$HTTP_PORT/   (sign in with the admin token: $token_hint)
TXT
if [ "$DEMO" = 1 ]; then
cat <<TXT
  demo backend   http://127.0.0.1:$MOCK_PORT/v1   (the bundled mock provider)

Your client key (shown once):
  export CLIENT_KEY=$CLIENT_KEY

Try it:
  curl http://127.0.0.1:$PORT/v1/chat/completions -H "authorization: Bearer \$CLIENT_KEY" \\
       -H 'content-type: application/json' \\
       -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}'
TXT
fi
cat <<TXT

Manage it:
  export SLUICE_ENDPOINT=$SLUICE_ENDPOINT SLUICE_ADMIN_TOKEN=\$(cat $DATA_DIR/admin-token)
  $BIN/sluicectl backend list
  $BIN/sluicectl dataplane list
  $BIN/sluicectl stats totals

Ctrl-C stops everything.
TXT
wait
