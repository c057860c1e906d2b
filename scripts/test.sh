#!/usr/bin/env bash
# The test command: installs what is missing, then runs formatting and lint
# checks and every test (unit, gRPC, and end-to-end with real dockerds, and
# the EC2 path against moto's server).
# Usage: scripts/test.sh [extra cargo-nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

ensure_runtime_deps
ensure_registry
# The packaging tests: packer (fmt, validate), systemd-analyze and systemctl;
# the workspace-sync and client tests drive Debian's docker-compose against a lease.
ensure_apt packer systemd docker-compose
ensure_moto
ensure_postgres
ensure_cfn_lint
ensure_ops_tools
ensure_python_clients
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# No separate `cargo build --bins`: nextest builds every package's binaries
# for its integration tests, with the tests' feature set; a plain build
# would compile the whole tree a second time with another one.
# Time limits live in .config/nextest.toml: every test is terminated after
# 3 minutes (5 for those with real dockerds), and with the ci profile the
# whole run fails after 60 minutes, inside CI's 90.
profile=default
[ "${CI:-}" = "true" ] && profile=ci
# The fuzzer itself is not run here (scripts/fuzz.sh runs it); its harness
# replays the corpus as a regular test (coordinator/tests/fuzz_corpus.rs).
cargo nextest run --workspace --locked --profile "$profile" "$@"
