#!/usr/bin/env bash
# The test command: installs what is missing, then runs formatting and lint
# checks and every test (unit, gRPC, and end-to-end with real dockerds, and
# the EC2 path against moto's server).
# Usage: scripts/test.sh [extra cargo-nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

ensure_runtime_deps
ensure_moto
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --locked --profile "$profile" "$@"
