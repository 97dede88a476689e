#!/usr/bin/env bash
# The one command for the benchmarks: builds the release binaries, runs every benchmark
# (`sluice-bench all`, which also runs `sluice-bench-ingest` when it is built) and writes
# BENCHMARKS.md at the repository root. Extra arguments go to `sluice-bench all`
# (e.g. `./e2e/bench.sh --quick --out /tmp/bench.md` for a smoke run).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

echo "==> cargo build --release --bins" >&2
cargo build --release --bins

# 1,000 streams through a data plane hold about 4,000 sockets across the processes.
want=65536
hard="$(ulimit -Hn)"
if [ "$hard" != "unlimited" ] && [ "$hard" -lt "$want" ]; then want="$hard"; fi
ulimit -n "$want" || echo "warning: could not raise the open-file limit (now $(ulimit -n))" >&2

echo "==> load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
SLUICE_BENCH_COMMAND="./e2e/bench.sh${*:+ $*}" \
    exec target/release/sluice-bench all "$@"
