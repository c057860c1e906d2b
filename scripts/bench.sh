#!/usr/bin/env bash
# The benchmark command: installs what the benchmarks need (dockerd, the
# docker CLI, busybox-static, iproute2), builds in release mode and runs
# every scenario, printing each figure with its same-run baseline and ratio.
# Usage: scripts/bench.sh [all|p1|p2|p3|p4|p5|idle|tls-front|sync|pg|cache|mirror|capacity ...] [--smoke] [berth-bench flags]
# Needs root (network namespaces, dockerd). See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

ensure_runtime_deps
# The pg scenario starts a PostgreSQL cluster of its own.
ensure_postgres
ensure_registry
# Every binary in one build (one feature resolution): the benchmarks start
# the release berth-agent, berth-coordinator and berth next to berth-bench.
cargo build --release --locked --workspace --bins
exec "${CARGO_TARGET_DIR:-target}"/release/berth-bench "$@"
