# Sourced by the benchmark scripts (needs $root and $bin): starts the local gateway,
# deploy/local/run.sh with the binaries in $bin, in a new data directory, and waits for it.
#
#   start_gateway PORT GRPC_PORT HTTP_PORT MOCK_PORT [RUN.SH OPTION...]
#
# Sets data (the data directory), log (run.sh's output), run (run.sh's pid) and key (a client
# key), and reads data/run/cluster.env (PROXY_PIDS, MOCK_PID, ...). The caller's exit trap
# kills $run and removes $data.
start_gateway() {
  warn_unless_shipped
  data="$(mktemp -d)"
  log="$data/run.log"
  RUST_LOG=${RUST_LOG:-info} "$root/deploy/local/run.sh" --no-build --bin-dir "$bin" --data-dir "$data" \
    --port "$1" --grpc-port "$2" --http-port "$3" --mock-port "$4" "${@:5}" > "$log" 2>&1 &
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

# Warns when $bin/sluice-proxy links tokio's `test-util` (its tests' paused clock), which the
# shipped binary does not: one `cargo build` of the binaries together with the examples unifies
# the examples' dev-dependencies into it, and its time driver then pays a lock and a second
# clock read at each park (about 550 instructions a request). Build the binaries and the bare
# proxy in two invocations: `cargo build --release --bins` and `cargo build --release -p
# sluice-proxy --example bare_proxy`.
warn_unless_shipped() {
  if command -v nm > /dev/null && nm -C "$bin/sluice-proxy" 2>/dev/null \
    | awk '/tokio::time::clock::Clock::pause/ { found = 1 } END { exit !found }'; then
    echo "$(basename "$0"): warning: $bin/sluice-proxy links tokio's test-util, unlike the shipped build;" \
      "build it with 'cargo build --release --bins' apart from the examples (docs/benchmarks.md)" >&2
  fi
}
