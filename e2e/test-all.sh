#!/usr/bin/env bash
# Runs every check Sluice has: formatting, clippy, and all tests of the workspace
# (unit, integration, end to end with the real binaries, SDK and proto-contract tests).
# Installs what the tests need when it is missing: nginx (Debian), the Python
# OpenAI SDK and grpcio-tools (PyPI), the Node OpenAI SDK and buf (npm, into e2e/tools/node_modules).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

log "checking test tools"
missing_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing_apt+=(nginx)
[ -x /usr/bin/chromium ] || missing_apt+=(chromium)
if [ ${#missing_apt[@]} -gt 0 ]; then
  log "installing ${missing_apt[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_apt[@]}" >/dev/null
fi
if ! python3 -c 'import grpc_tools, openai, kubernetes_validate' >/dev/null 2>&1; then
  log "installing grpcio-tools, openai and kubernetes-validate (pip)"
  python3 -m pip install --quiet grpcio-tools openai kubernetes-validate
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
