# Sourced by the benchmark scripts (needs $root and $bin): starts the local gateway,
# deploy/local/run.sh with the binaries in $bin, in a new data directory, and waits for it.
#
#   start_gateway PORT GRPC_PORT HTTP_PORT MOCK_PORT
#
# Sets data (the data directory), log (run.sh's output), run (run.sh's pid) and key (a client
# key), and reads data/run/cluster.env (PROXY_PIDS, MOCK_PID, ...). The caller's exit trap
# kills $run and removes $data.
start_gateway() {
  data="$(mktemp -d)"
  log="$data/run.log"
  RUST_LOG=${RUST_LOG:-info} "$root/deploy/local/run.sh" --no-build --bin-dir "$bin" --data-dir "$data" \
    --port "$1" --grpc-port "$2" --http-port "$3" --mock-port "$4" > "$log" 2>&1 &
  run=$!
  for _ in $(seq 1 300); do
    grep -q 'PROXY_PIDS' "$data/run/cluster.env" 2>/dev/null && grep -q 'sk-sluice-' "$log" && break
    sleep 0.1
  done
  key=$(grep -o 'sk-sluice-[0-9a-f]*' "$log" | head -1 || true)
  [ -n "$key" ] || { echo "$(basename "$0"): the local gateway did not start; see $log" >&2; return 1; }
  # shellcheck disable=SC1091
  . "$data/run/cluster.env"
}
