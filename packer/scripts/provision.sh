#!/usr/bin/env bash
# Bakes a berth pool host: installs the Docker engine with its own units
# masked (berth-agent starts dockerd itself, and a second dockerd must never
# run), installs berth-agent, its unit and configuration, then removes
# everything that would make two instances of the image alike (SSH host keys,
# machine-id, cloud-init state, logs).
#
# Run by packer (packer/berth.pkr.hcl) as root on the build instance. Also run
# by the tests into a throwaway root, which is why every path it writes is
# under $BERTH_ROOT.
#
# Environment:
#   BERTH_SRC         staging directory holding berth-agent, systemd/*.service
#                     and files/agent.{toml,env} (default /tmp/berth-bake)
#   BERTH_ROOT        root of the filesystem to install into (default /)
#   BERTH_SKIP_APT    1: install no packages (tests; an image that has them)
#   BERTH_REMOVE_SRC  1: delete BERTH_SRC at the end (the packer build)
set -euo pipefail

SRC=${BERTH_SRC:-/tmp/berth-bake}
ROOT=${BERTH_ROOT:-/}
SKIP_APT=${BERTH_SKIP_APT:-0}
REMOVE_SRC=${BERTH_REMOVE_SRC:-0}

log() { echo "provision: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# An empty or relative root would scatter files over the working directory.
case "$ROOT" in
  /*) ;;
  *) die "BERTH_ROOT must be an absolute path, got '$ROOT'" ;;
esac
ROOT=$(realpath -m "$ROOT")
# "$R/etc" is "/etc" for the real root and "/tmp/x/etc" for a test root.
R=${ROOT%/}
[ -d "$ROOT" ] || die "BERTH_ROOT $ROOT does not exist"
[ "$SKIP_APT" = 1 ] || [ "$R" = "" ] || die "apt installs into / only: set BERTH_SKIP_APT=1 with BERTH_ROOT=$ROOT"
for f in berth-agent systemd/berth-agent.service files/agent.toml files/agent.env; do
  [ -f "$SRC/$f" ] || die "$SRC/$f is missing (see the file provisioners in packer/berth.pkr.hcl)"
done

# systemctl --root edits unit symlinks without a running systemd, so the same
# calls work on the build instance and in a throwaway root.
unitctl() { systemctl --quiet --root="$ROOT" "$@"; }

# --- Packages ---
if [ "$SKIP_APT" != 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # Keep maintainer scripts from starting dockerd/containerd during the bake:
  # a daemon started here would leave state (/var/lib/docker, an engine key)
  # in the image. policy-rc.d exit code 101 means "action forbidden".
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq
  # The base AMI is as old as its release; bake today's security fixes in.
  apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade
  # docker.io: dockerd, containerd, runc and the docker CLI (for operators).
  # iproute2: the agent inspects addresses and routes.
  # iptables: dockerd manages the instance's NAT and forwarding with it, and
  # the agent adds the host's own rules (DOCKER-USER) with it.
  apt-get install -y -qq --no-install-recommends docker.io iproute2 iptables ca-certificates
fi

# --- Nothing but the agent starts dockerd ---
for unit in docker.service docker.socket containerd.service; do
  # Disable first so no stale wants-symlink is left, if the unit exists.
  if [ -e "$R/lib/systemd/system/$unit" ] || [ -e "$R/usr/lib/systemd/system/$unit" ]; then
    unitctl disable "$unit"
  fi
  # Masked: neither a dependency, a socket activation nor an operator's
  # `systemctl start` can bring up a second daemon next to the agent's.
  unitctl mask "$unit"
done

# --- berth-agent ---
install -D -m 0755 "$SRC/berth-agent" "$R/usr/local/bin/berth-agent"
install -D -m 0644 "$SRC/systemd/berth-agent.service" "$R/etc/systemd/system/berth-agent.service"
install -d -m 0755 "$R/etc/berth"
install -m 0644 "$SRC/files/agent.toml" "$R/etc/berth/agent.toml"
# May carry the pool's join credential.
install -m 0600 "$SRC/files/agent.env" "$R/etc/berth/agent.env"
# The unit's StateDirectory= creates /var/lib/berth at every start too; made
# here so the image is complete on its own and inspectable before first boot.
install -d -m 0700 "$R/var/lib/berth" "$R/var/lib/berth/hosts"
# dockerd 20.10 writes its engine key here at first start. The unit keeps
# this directory writable but /etc read-only, so it must exist beforehand.
install -d -m 0755 "$R/etc/docker"
unitctl enable berth-agent.service

# --- Every instance boots fresh ---
log "cleaning up"
# Package caches and lists: dead weight in every instance's volume.
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/cache/apt/*.bin "$R"/var/lib/apt/lists/*
# Anything a daemon may have created despite policy-rc.d, and the engine key,
# which must differ per instance.
rm -rf "$R/var/lib/docker" "$R/var/lib/containerd" "$R/etc/docker/key.json"
# Logs of the bake belong to the bake, not to every host.
if [ -d "$R/var/log" ]; then
  find "$R/var/log" -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \) -delete
  find "$R/var/log" -type f -exec truncate -s 0 {} +
fi
rm -rf "$R"/var/log/journal/*
# SSH host keys are generated per instance at first boot (cloud-init);
# baked keys would be shared by every host of the pool.
rm -f "$R"/etc/ssh/ssh_host_*
# The build's temporary key pair is gone from AWS, but its public half would
# still sit in the image.
rm -f "$R"/root/.ssh/authorized_keys "$R"/home/*/.ssh/authorized_keys
rm -f "$R"/root/.bash_history "$R"/home/*/.bash_history
# An empty machine-id (not a missing one) makes systemd generate a new id at
# first boot; identical ids break DHCP client ids and journald.
install -D -m 0444 /dev/null "$R/etc/machine-id"
# On Debian this is a symlink to /etc/machine-id; a copy would go stale.
if [ -f "$R/var/lib/dbus/machine-id" ] && [ ! -L "$R/var/lib/dbus/machine-id" ]; then
  rm -f "$R/var/lib/dbus/machine-id"
fi
# cloud-init state (instance ids, semaphores, logs): without it every
# instance runs cloud-init as a first boot (new host keys, its own hostname).
rm -rf "$R"/var/lib/cloud/* "$R"/var/log/cloud-init*.log
# /tmp itself is left alone: services of the running build instance keep
# their private directories there, and Debian empties /tmp at every boot.

if [ "$REMOVE_SRC" = 1 ]; then
  rm -rf "$SRC"
fi
log "done: berth-agent.service enabled under $ROOT"
