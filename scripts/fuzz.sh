#!/usr/bin/env bash
# Runs the agent stream's fuzz target (coordinator/fuzz) with libFuzzer for a
# while, on the default (stable) toolchain: cargo-fuzz passes flags only a
# nightly rustc accepts, which RUSTC_BOOTSTRAP=1 unlocks, and without a
# nightly std there is no AddressSanitizer, so the target is built with
# `--sanitizer none` (the harness is safe Rust; what it looks for are panics
# and broken pool invariants). `RUSTUP_TOOLCHAIN=nightly scripts/fuzz.sh`
# builds with a nightly toolchain instead (a separate, full build).
# cargo-fuzz is installed if missing. The first build is long (release,
# every dependency instrumented: about 45 minutes on two busy cores), later
# ones rebuild the coordinator only.
# CI does not run this; there the same harness replays the corpus as a
# regular test (coordinator/tests/fuzz_corpus.rs).
#
# Usage: scripts/fuzz.sh [SECONDS] [--keep]   (default 60 seconds)
#   --keep  merge what the run found into the checked-in corpus
#           (coordinator/fuzz/corpus/agent_stream), minimised with
#           `cargo fuzz cmin` so it stays small.
# A crash leaves its input under coordinator/fuzz/artifacts/agent_stream/;
# add it to the corpus and the corpus test replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
keep="${2:-}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz)
flags=(--sanitizer none)
# With CARGO_TARGET_DIR set, the fuzz build (release, instrumented) goes
# beside the usual ones instead of coordinator/fuzz/target.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  flags+=(--target-dir "$CARGO_TARGET_DIR/fuzz")
fi
checked_in=coordinator/fuzz/corpus/agent_stream
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
cp "$checked_in"/* "$corpus"/
(cd coordinator && "${fuzz[@]}" run "${flags[@]}" agent_stream "$corpus" -- \
   -max_total_time="$seconds" -rss_limit_mb=2048)
echo "fuzz: agent_stream ran ${seconds}s without a crash" >&2
if [ "$keep" = "--keep" ]; then
  # cmin keeps a small set of inputs that covers what the run reached; with
  # -use_counters=0 one input per code edge rather than per hit-count
  # bucket: the same edges in about a tenth of the bytes. The seeds stay
  # as they are (the corpus test writes them).
  merged="$(mktemp -d)"
  trap 'rm -rf "$corpus" "$merged"' EXIT
  cp "$corpus"/* "$merged"/
  (cd coordinator && "${fuzz[@]}" cmin "${flags[@]}" agent_stream "$merged" -- -use_counters=0)
  find "$checked_in" -type f ! -name 'seed-*' -delete
  for f in "$merged"/*; do
    [ -e "$checked_in/$(basename "$f")" ] || cp "$f" "$checked_in"/
  done
  echo "fuzz: corpus now $(ls "$checked_in" | wc -l) inputs, $(du -sh "$checked_in" | cut -f1)" >&2
fi
