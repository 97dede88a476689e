#!/usr/bin/env bash
# Runs every check Sluice has: formatting, clippy, and all tests of the workspace
# (unit, integration, end to end with the real binaries, SDK and proto-contract tests).
# Installs what the tests need when it is missing: nginx, chromium, sqlite3, openssl and Node
# (Debian's packages, as root or through sudo), the Python OpenAI and Anthropic SDKs,
# grpcio-tools and kubernetes-validate (PyPI: into a virtual environment under target/ unless the
# python3 on PATH has them), the Node OpenAI SDK and buf (npm, into e2e/tools/node_modules).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says when it starts (seconds since the script's): where a slow run spent its time.
log() { printf '\n== [%ds] %s\n' "$SECONDS" "$*"; }

log "checking test tools"
# Packages come from the distribution (Debian's apt): as root, or through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "test-all.sh: installing packages needs root: run it as root or install sudo" >&2
    exit 1
  fi
}
missing_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing_apt+=(nginx)
[ -x /usr/bin/chromium ] || missing_apt+=(chromium)
# The restore test backs the database up as docs/operating.md ("Backups") tells operators to.
command -v sqlite3 >/dev/null 2>&1 || missing_apt+=(sqlite3)
# The TLS test makes its CA and certificate with it.
command -v openssl >/dev/null 2>&1 || missing_apt+=(openssl)
# The Node SDK test and buf (the proto contract).
command -v npm >/dev/null 2>&1 || missing_apt+=(nodejs npm)
# The fuzz step builds libFuzzer, which is C++.
command -v c++ >/dev/null 2>&1 || missing_apt+=(g++)
python_tools='import grpc_tools, openai, anthropic, kubernetes_validate'
# A distribution's own Python refuses pip installs into it (PEP 668): the tools then go to a
# virtual environment of the checkout's, first on PATH for the tests.
venv="$(realpath -m "${CARGO_TARGET_DIR:-target}")/python-tools"
if [ -x "$venv/bin/python3" ]; then
  export PATH="$venv/bin:$PATH"
fi
# Debian ships the venv module without ensurepip (python3-venv), so `venv --help` answers
# where making one fails: what making one needs is looked for.
if ! python3 -c "$python_tools" >/dev/null 2>&1 && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing_apt+=(python3-venv python3-pip)
fi
if [ ${#missing_apt[@]} -gt 0 ]; then
  log "installing ${missing_apt[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_apt[@]}" >/dev/null
fi
if ! python3 -c "$python_tools" >/dev/null 2>&1; then
  log "installing grpcio-tools, openai, anthropic and kubernetes-validate (pip, into $venv)"
  [ -x "$venv/bin/python3" ] || python3 -m venv "$venv"
  export PATH="$venv/bin:$PATH"
  python3 -m pip install --quiet grpcio-tools openai anthropic kubernetes-validate
fi
if [ ! -x e2e/tools/node_modules/.bin/buf ] || [ ! -d e2e/tools/node_modules/openai ]; then
  log "installing buf and openai (npm ci, into e2e/tools/node_modules)"
  (cd e2e/tools && npm ci --silent --no-audit --no-fund)
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# The fuzz targets are a crate of their own, outside the workspace (cargo-fuzz's layout), and
# hold the oracles of the translations and parsers: checked as the workspace is.
log "cargo fmt --check and cargo clippy (fuzz targets)"
cargo fmt --manifest-path data-plane/fuzz/Cargo.toml --all -- --check
cargo clippy --manifest-path data-plane/fuzz/Cargo.toml \
  --target-dir "$(realpath -m "${CARGO_TARGET_DIR:-target}")/fuzz" --all-targets -- -D warnings

log "cargo build (binaries the end-to-end tests start)"
cargo build --workspace --bins

# Twice as many tests at once as there are cores, 8 at most: the end-to-end tests spend most of
# their time waiting on the processes they start (about one core busy in all at four at a time on
# two), and each starts several (a control plane, replicas, mocks, nginx, a browser).
cores="$(nproc)"
test_threads="${RUST_TEST_THREADS:-$((cores * 2 > 8 ? 8 : cores * 2))}"
log "cargo test ($test_threads tests at a time)"
RUST_TEST_THREADS="$test_threads" cargo test --workspace

# The cargo-fuzz targets (request parsing, SSE parsing, the Anthropic stream translations, the
# whole requests' and answers' Anthropic translations, reading usage) for a short bounded time from the
# committed seeds plus whatever corpus earlier runs left; a crash fails the run. Longer runs
# by hand: see "Fuzzing" in docs/testing.md. SLUICE_FUZZ_SECONDS=0 skips this step.
# No sanitizer: the code under test is safe Rust (unsafe_code is forbidden), and without
# AddressSanitizer the 30 s do 5 to 7 times more executions; debug assertions (overflow
# checks) stay on. The long runs by hand keep ASan. Its own target dir, so switching between
# the two does not rebuild everything.
fuzz_seconds="${SLUICE_FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" -gt 0 ]; then
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
  fuzz_dir="$(realpath -m "${CARGO_TARGET_DIR:-target}")/fuzz"
  mkdir -p "$fuzz_dir"
  # cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
  fuzz() { (cd data-plane && RUSTC_BOOTSTRAP=1 cargo fuzz "$1" --sanitizer none --target-dir "$fuzz_dir" "${@:2}"); }
  log "cargo fuzz build"
  fuzz build
  # Each target runs on one core: as many at once as the machine has cores, each its full time.
  fuzz_targets=(request sse anthropic_stream anthropic_translation usage)
  fuzz_parallel="$(nproc)"
  log "cargo fuzz run (${fuzz_seconds}s per target, $fuzz_parallel at a time)"
  fuzz_one() {
    local target="$1" fuzz_log="$fuzz_dir/$1.log"
    mkdir -p "data-plane/fuzz/corpus/$target"
    if fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$fuzz_seconds" -print_final_stats=1 >"$fuzz_log" 2>&1; then
      grep -E '^Done [0-9]+ runs' "$fuzz_log" | sed "s/^/$target: /"
    else
      tail -n 60 "$fuzz_log"
      echo "fuzz target $target failed; the input is in data-plane/fuzz/artifacts/$target/" >&2
      return 1
    fi
  }
  fuzz_failed=0
  running=()
  for target in "${fuzz_targets[@]}"; do
    fuzz_one "$target" &
    running+=("$!")
    if [ "${#running[@]}" -ge "$fuzz_parallel" ] || [ "$target" = "${fuzz_targets[-1]}" ]; then
      for pid in "${running[@]}"; do wait "$pid" || fuzz_failed=1; done
      running=()
    fi
  done
  [ "$fuzz_failed" -eq 0 ] || exit 1
fi

log "every check passed"
