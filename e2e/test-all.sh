#!/usr/bin/env bash
# Runs every check Sluice has: formatting, clippy, and all tests of the workspace
# (unit, integration, end to end with the real binaries, SDK and proto-contract tests).
# Installs what the tests need when it is missing: nginx, chromium, sqlite3 and openssl (Debian), the Python
# OpenAI and Anthropic SDKs, grpcio-tools and kubernetes-validate (PyPI), the Node OpenAI SDK and
# buf (npm, into e2e/tools/node_modules).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

log "checking test tools"
missing_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing_apt+=(nginx)
[ -x /usr/bin/chromium ] || missing_apt+=(chromium)
# The restore test backs the database up as docs/operating.md ("Backups") tells operators to.
command -v sqlite3 >/dev/null 2>&1 || missing_apt+=(sqlite3)
# The TLS test makes its CA and certificate with it.
command -v openssl >/dev/null 2>&1 || missing_apt+=(openssl)
if [ ${#missing_apt[@]} -gt 0 ]; then
  log "installing ${missing_apt[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_apt[@]}" >/dev/null
fi
if ! python3 -c 'import grpc_tools, openai, anthropic, kubernetes_validate' >/dev/null 2>&1; then
  log "installing grpcio-tools, openai, anthropic and kubernetes-validate (pip)"
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

log "cargo build (binaries the end-to-end tests start)"
cargo build --workspace --bins

log "cargo test"
cargo test --workspace

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
  log "cargo fuzz (${fuzz_seconds}s per target)"
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
  fuzz_dir="$(realpath -m "${CARGO_TARGET_DIR:-target}")/fuzz"
  mkdir -p "$fuzz_dir"
  for target in request sse anthropic_stream anthropic_translation usage; do
    mkdir -p "data-plane/fuzz/corpus/$target"
    fuzz_log="$fuzz_dir/$target.log"
    # cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
    if (cd data-plane && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none \
          --target-dir "$fuzz_dir" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
          -max_total_time="$fuzz_seconds" -print_final_stats=1) >"$fuzz_log" 2>&1; then
      grep -E '^Done [0-9]+ runs' "$fuzz_log" | sed "s/^/$target: /"
    else
      tail -n 60 "$fuzz_log"
      echo "fuzz target $target failed; the input is in data-plane/fuzz/artifacts/$target/" >&2
      exit 1
    fi
  done
fi
