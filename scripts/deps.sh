# Installs what berth needs on a fresh Debian/Ubuntu machine, if missing.
# Sourced by scripts/up.sh and scripts/test.sh.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_apt PACKAGE... : installs the Debian packages that are not installed yet.
ensure_apt() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Packages the pool itself needs: dockerd and its CLI (Debian's 20.10 CLI at
# /usr/bin/docker has BuildKit built in), a static busybox for images built
# FROM scratch, iproute2 for network namespaces (and `ss`), nsenter,
# iptables (dockerd manages each host's NAT and forwarding with it, inside
# the host's namespace, and the agent adds the host's own rules; docker.io
# depends on it, named here because berth calls it too); curl and openssl
# are the stock TLS clients the security tests probe the Docker front with.
ensure_runtime_deps() {
  ensure_apt docker.io busybox-static iproute2 iptables util-linux e2fsprogs ca-certificates curl openssl
  command -v cargo >/dev/null || { echo "cargo is missing: install Rust (https://rustup.rs)" >&2; exit 1; }
}

# Operations tests: promtool (Debian's prometheus package) checks the
# /metrics output, and Python's grpcio + grpcio-health-checking are a gRPC
# client that is not berth's own (health check, reflection).
ensure_ops_tools() {
  ensure_apt prometheus
  if ! python3 -c 'import grpc, grpc_health.v1' >/dev/null 2>&1; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      ensure_apt python3 python3-pip
    fi
    echo "installing grpcio grpcio-health-checking" >&2
    python3 -m pip install --quiet grpcio grpcio-health-checking \
      || python3 -m pip install --quiet --break-system-packages grpcio grpcio-health-checking
  fi
}

# The shared store's tests start a private PostgreSQL cluster of their own
# (initdb + pg_ctl from /usr/lib/postgresql/15/bin into a temp dir): the
# server binaries and the `postgres` user come with Debian's `postgresql`
# package; the tests use no system service (a cluster the package may have
# started is left alone: the tests' clusters listen on free ports).
ensure_postgres() {
  [ -x /usr/lib/postgresql/15/bin/pg_ctl ] && id postgres >/dev/null 2>&1 && return 0
  ensure_apt postgresql
  [ -x /usr/lib/postgresql/15/bin/pg_ctl ] \
    || { echo "PostgreSQL 15's server binaries are missing after installing postgresql" >&2; exit 1; }
}

# moto's server stands in for the EC2 API in the EC2 end-to-end tests.
# Installed with pip; on a system Python that refuses (PEP 668), into it anyway,
# since it is a test-only tool on a throwaway machine.
ensure_moto() {
  command -v moto_server >/dev/null && return 0
  if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
    ensure_apt python3 python3-pip
  fi
  echo "installing moto[server]" >&2
  python3 -m pip install --quiet 'moto[server]' \
    || python3 -m pip install --quiet --break-system-packages 'moto[server]'
  hash -r
  command -v moto_server >/dev/null || { echo "moto_server is not on PATH after installing moto[server]" >&2; exit 1; }
}

# cfn-lint validates the deployable group (deploy/berth-pool.json) offline.
ensure_cfn_lint() {
  command -v cfn-lint >/dev/null && return 0
  if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
    ensure_apt python3 python3-pip
  fi
  echo "installing cfn-lint" >&2
  python3 -m pip install --quiet cfn-lint \
    || python3 -m pip install --quiet --break-system-packages cfn-lint
  hash -r
  command -v cfn-lint >/dev/null || { echo "cfn-lint is not on PATH after installing it" >&2; exit 1; }
}

# Real Docker clients the client tests drive against a lease, unchanged:
# PyPI's Docker SDK (`docker`) and Testcontainers for Python (4.x).
# (docker-compose 1.29 comes from Debian: see scripts/test.sh.)
ensure_python_clients() {
  if python3 -c 'import docker, testcontainers.core.container' >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
    ensure_apt python3 python3-pip
  fi
  echo "installing docker testcontainers (PyPI)" >&2
  python3 -m pip install --quiet 'docker>=7,<8' 'testcontainers>=4,<5' \
    || python3 -m pip install --quiet --break-system-packages 'docker>=7,<8' 'testcontainers>=4,<5'
  python3 -c 'import docker, testcontainers.core.container' \
    || { echo "python3 cannot import docker and testcontainers after installing them" >&2; exit 1; }
}

# The pool's registries: CNCF distribution from Debian (`docker-registry`,
# 2.8), which `berth up` runs as the pull-through mirror and as the tenants'
# build cache, and the end-to-end tests as the stand-in "upstream". berth
# runs its own instances with their own configuration; on a machine where
# systemd is PID 1 the package also enables and starts a registry of its
# own on :5000 (all addresses, no TLS, no authentication), which is
# stopped and disabled here when this function installs the package.
ensure_registry() {
  if dpkg-query -W -f='${Status}' docker-registry 2>/dev/null | grep -q "install ok installed"; then
    return 0
  fi
  ensure_apt docker-registry
  if [ -d /run/systemd/system ]; then
    as_root systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
  fi
  command -v docker-registry >/dev/null || { echo "docker-registry is not on PATH after installing it" >&2; exit 1; }
}
