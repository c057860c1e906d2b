#!/usr/bin/env bash
# The test command: installs what is missing, then runs formatting and lint
# checks and every test (unit, gRPC, and end-to-end with real dockerds).
# Usage: scripts/test.sh [extra cargo-nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

ensure_runtime_deps
# The packaging tests: packer (fmt, validate), systemd-analyze and systemctl.
ensure_apt packer systemd
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
profile=default
[ "${CI:-}" = "true" ] && profile=ci
# The agent stream's fuzz target (coordinator/fuzz) runs for a while where a
# nightly toolchain is installed (libFuzzer needs one); everywhere, the same
# harness replays its corpus as a regular test (coordinator/tests/fuzz_corpus.rs).
# BERTH_FUZZ_SECONDS=0 skips the fuzzer run.
fuzz_seconds="${BERTH_FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" -gt 0 ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
  fi
  corpus="$(mktemp -d)"
  trap 'rm -rf "$corpus"' EXIT
  cp coordinator/fuzz/corpus/agent_stream/* "$corpus"/
  (cd coordinator && cargo +nightly fuzz run --sanitizer none agent_stream "$corpus" -- \
     -max_total_time="$fuzz_seconds" -rss_limit_mb=2048)
  echo "fuzz: agent_stream ran ${fuzz_seconds}s without a crash" >&2
else
  echo "fuzz: no nightly toolchain (or BERTH_FUZZ_SECONDS=0); the corpus replay test stands in" >&2
fi

cargo nextest run --workspace --locked --profile "$profile" "$@"
