#!/usr/bin/env bash
# The yardstick for the data plane's figures: nginx as a plain keep-alive reverse proxy in front
# of the same mock provider, measured with the same load driver and the mock as the baseline.
# It shows what two more loopback hops and a proxy that does no per-request work of its own
# cost on this machine. Needs nginx and release binaries (`cargo build --release --bins`).
#
# With --hyper it measures Sluice against data-plane/examples/bare_proxy.rs, the cheapest proxy
# on Sluice's own stack (axum, hyper-util's client, tokio, a runtime per core) and the floor the
# data plane is held to: a whole gateway (control plane, mock, one data plane with every feature
# on: authentication, usage accounting, metrics, a log line per request at info, written to a
# file) and the bare proxy in front of the same mock, driven alternately in the same run; each
# table ends with the ratio Sluice / bare proxy. `cargo build --release -p sluice-proxy
# --example bare_proxy` first. `shared` runs the bare proxy on one multi-threaded runtime.
#
#   ./e2e/bench-nginx.sh            # 1,000 req/s open loop, then saturation with 64 connections
#   ./e2e/bench-nginx.sh --hyper [shared]   # Sluice vs bare_proxy: 1,000 req/s, then saturation
#                                           # with 32 connections (CONNECTIONS, DURATION)
#   BIN_DIR=DIR ./e2e/bench-nginx.sh --hyper   # the binaries in DIR (and DIR/examples/bare_proxy)
#                                           # instead of target/release: two builds alternated
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${BIN_DIR:-$root/target/release}"
for exe in sluice-mock sluice-bench; do
  [ -x "$bin/$exe" ] || { echo "bench-nginx: $bin/$exe missing; run cargo build --release --bins" >&2; exit 1; }
done
hyper=""
if [ "${1:-}" = "--hyper" ]; then
  hyper="${2:-per-core}"
  [ -x "$bin/examples/bare_proxy" ] || { echo "bench-nginx: $bin/examples/bare_proxy missing; run cargo build --release -p sluice-proxy --example bare_proxy" >&2; exit 1; }
else
  command -v nginx >/dev/null || { echo "bench-nginx: nginx not found (apt-get install -y nginx)" >&2; exit 1; }
fi

# Sluice (deploy/local/run.sh: control plane, mock, one data plane) and the bare proxy in front
# of its mock, compared in one run.
sluice_hyper() {
  # Globals, not locals: the exit trap runs after this function returned.
  run=""
  data=""
  bare=""
  trap 'kill $run $bare 2>/dev/null || true; wait 2>/dev/null || true; [ -z "$data" ] || rm -rf "$data"' EXIT
  # shellcheck source=e2e/bench-gateway.sh
  . "$root/e2e/bench-gateway.sh"
  start_gateway 18080 15051 18081 19090
  "$bin/examples/bare_proxy" "127.0.0.1:18190" "http://127.0.0.1:19090" "$hyper" > "$data/bare.log" 2>&1 &
  bare=$!
  # The load starts by asking both for their models: wait until the bare proxy listens.
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null http://127.0.0.1:18190/v1/models 2>/dev/null && break
    sleep 0.1
  done
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "Sluice: http://127.0.0.1:18080/v1; bare proxy (the baseline): http://127.0.0.1:18190/v1"
  local common=(--url http://127.0.0.1:18080/v1 --key "$key" --model gpt-4o-mini
                --baseline-url http://127.0.0.1:18190/v1 --baseline-key sk-bench)
  "$bin/sluice-bench" load "${common[@]}" --rate 1000 --duration "${DURATION:-10s}"
  "$bin/sluice-bench" load "${common[@]}" --saturate --connections "${CONNECTIONS:-32}" --duration "${DURATION:-10s}"
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
}

mock_port=${MOCK_PORT:-19190}
nginx_port=${NGINX_PORT:-18190}
dir="$(mktemp -d)"
mkdir -p "$dir/logs"
cat > "$dir/nginx.conf" <<EOF
worker_processes 1;
error_log $dir/logs/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  upstream mock { server 127.0.0.1:$mock_port; keepalive 128; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF

if [ -n "$hyper" ]; then
  sluice_hyper
  exit
fi

"$bin/sluice-mock" --listen "127.0.0.1:$mock_port" > "$dir/mock.log" 2>&1 &
mock=$!
proxy=""
if [ -n "$hyper" ]; then
  "$bin/examples/bare_proxy" "127.0.0.1:$nginx_port" "http://127.0.0.1:$mock_port" "$hyper" > "$dir/bare.log" 2>&1 &
  proxy=$!
else
  nginx -c "$dir/nginx.conf" -p "$dir" -e "$dir/logs/error.log"
fi
cleanup() {
  [ -n "$hyper" ] || nginx -c "$dir/nginx.conf" -p "$dir" -e "$dir/logs/error.log" -s stop 2>/dev/null || true
  [ -z "$proxy" ] || kill "$proxy" 2>/dev/null || true
  kill "$mock" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:$nginx_port/v1/models" 2>/dev/null && break
  sleep 0.1
done

common=(--url "http://127.0.0.1:$nginx_port/v1" --key sk-bench --model bench-model
        --baseline-url "http://127.0.0.1:$mock_port/v1")
"$bin/sluice-bench" load "${common[@]}" --rate 1000 --duration 15s
"$bin/sluice-bench" load "${common[@]}" --saturate --connections 64 --duration 10s
