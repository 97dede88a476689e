#!/usr/bin/env bash
# The yardstick for the data plane's figures: nginx as a plain keep-alive reverse proxy in front
# of the same mock provider, measured with the same load driver and the mock as the baseline.
# It shows what two more loopback hops and a proxy that does no per-request work of its own
# cost on this machine. Needs nginx and release binaries (`cargo build --release --bins`).
# With --hyper it measures data-plane/examples/bare_proxy.rs instead: the cheapest proxy on
# Sluice's own stack (axum, hyper-util's client, tokio), which shows the stack's share of
# Sluice's cost (`cargo build --release -p sluice-proxy --example bare_proxy` first).
#
#   ./e2e/bench-nginx.sh            # 1,000 req/s open loop, then saturation with 64 connections
#   ./e2e/bench-nginx.sh --hyper [shared]   # the same against bare_proxy (per-core or shared)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release"
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
