#!/usr/bin/env bash
# Runs the agent stream's fuzz target (coordinator/fuzz) with libFuzzer for a
# while. Needs a nightly toolchain and cargo-fuzz (installed if missing).
# CI does not run this (its cold build alone takes many minutes); there the
# same harness replays the corpus as a regular test
# (coordinator/tests/fuzz_corpus.rs).
# Usage: scripts/fuzz.sh [SECONDS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
cp coordinator/fuzz/corpus/agent_stream/* "$corpus"/
(cd coordinator && cargo +nightly fuzz run --sanitizer none agent_stream "$corpus" -- \
   -max_total_time="$seconds" -rss_limit_mb=2048)
echo "fuzz: agent_stream ran ${seconds}s without a crash" >&2
