#!/usr/bin/env bash
# The main job: installs what is missing, builds berth, and runs a whole pool
# on this machine (`berth up`): a coordinator and N hosts, each a real dockerd
# in its own network namespace. Ctrl-C stops it and leaves nothing behind.
# Usage: scripts/up.sh [--hosts N] [other `berth up` flags]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh

ensure_runtime_deps
ensure_registry
cargo build --release --bins --locked
echo "berth: binaries in $PWD/target/release (add it to PATH to use \`berth\` in another shell)" >&2
if [ "$(id -u)" -ne 0 ]; then
  exec sudo "$PWD/target/release/berth" up "$@"
fi
exec "$PWD/target/release/berth" up "$@"
