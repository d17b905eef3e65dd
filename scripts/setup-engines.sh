#!/usr/bin/env bash
# Installs and configures the container engines sandboxctl drives, so a fresh
# Debian machine can run it. Idempotent: safe to run again.
set -euo pipefail

need_apt=()
command -v podman >/dev/null || need_apt+=(podman)
command -v runc >/dev/null || need_apt+=(runc)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx wget || need_apt+=(busybox-static)
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)
command -v dockerd >/dev/null || need_apt+=(docker.io)
# compose.yaml's images are built from Debian packages (scripts/build-images.sh) and brought up
# with Debian's docker-compose (the docker CLI here has no compose plugin).
command -v mmdebstrap >/dev/null || need_apt+=(mmdebstrap)
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# crun fails on this machine's hybrid cgroups and setrlimit is not permitted,
# so podman is pinned to runc and told not to apply default ulimits.
mkdir -p /etc/containers
conf=/etc/containers/containers.conf
if ! grep -q 'sandboxctl' "$conf" 2>/dev/null; then
  cat >"$conf" <<'CONF'
# written by sandboxctl scripts/setup-engines.sh
[containers]
default_ulimits = []

[engine]
runtime = "runc"
events_logger = "file"
cgroup_manager = "cgroupfs"
CONF
fi
echo "engines ready: $(podman --version), runc $(runc --version | head -1 | awk '{print $3}')"
