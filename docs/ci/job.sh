#!/bin/sh
# The shell steps of the CI examples in README.md (GitHub Actions and
# GitLab CI), kept in one file so the README shows exactly what the
# end-to-end test tests/tests/ci_example_e2e.rs runs against a pool.
#
# Usage: docs/ci/job.sh acquire|test|release
#   acquire  get a host for $BERTH_BUILD_ID; its settings go to $BERTH_ENV_FILE
#   test     build $APP_DIR on the host, run it as a service, reach it
#   release  give the host back (safe to run when acquire failed)
# Settings: BERTH_BUILD_ID (required), BERTH_ENV_FILE (default ./berth.env),
# APP_DIR (default .), APP_PORT (the port the app listens on, default 80),
# and the berth CLI's own: BERTH_COORDINATOR, BERTH_CA, BERTH_TOKEN(_FILE).
set -eu
step=${1:?usage: job.sh acquire|test|release}
env_file=${BERTH_ENV_FILE:-./berth.env}

case "$step" in
acquire)
  # stdout is only `export` lines; progress while waiting goes to stderr.
  berth acquire --build "${BERTH_BUILD_ID:?set BERTH_BUILD_ID}" --ttl 30m --wait 5m >"$env_file.tmp"
  mv "$env_file.tmp" "$env_file"
  . "$env_file"
  echo "berth: lease $BERTH_LEASE_ID on $BERTH_HOST_ADDR until $BERTH_LEASE_DEADLINE" >&2
  ;;
test)
  . "$env_file"
  docker build -t app "${APP_DIR:-.}"
  docker run -d --name app -p "8080:${APP_PORT:-80}" app
  # Published ports answer at the host's address.
  tries=0
  until curl -fsS "http://$BERTH_HOST_ADDR:8080/"; do
    tries=$((tries + 1))
    [ "$tries" -lt 30 ] || { docker logs app >&2; exit 1; }
    sleep 1
  done
  ;;
release)
  if [ ! -f "$env_file" ]; then
    echo "berth: no lease to release" >&2
    exit 0
  fi
  . "$env_file"
  berth release
  rm -f "$env_file"
  ;;
*)
  echo "usage: job.sh acquire|test|release" >&2
  exit 2
  ;;
esac
