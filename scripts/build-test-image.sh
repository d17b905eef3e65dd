#!/usr/bin/env bash
# Builds the sandbox test image offline (no registry is reachable): a rootfs
# holding Debian's static busybox, imported as an image into podman (unless
# SKIP_PODMAN is set) and, when a docker daemon is given through DOCKER_HOST,
# into docker as well.
set -euo pipefail
image=${SANDBOXCTL_TEST_IMAGE:-localhost/sandboxctl-busybox:latest}
busybox=${BUSYBOX:-/bin/busybox}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/rootfs"/{bin,tmp,workspace,etc,proc,sys,dev,root}
cp "$busybox" "$work/rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$work/rootfs/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$work/rootfs/etc/passwd"
echo 'root:x:0:' >"$work/rootfs/etc/group"
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .

# PID 1 traps TERM so a graceful stop returns at once instead of waiting out the timeout.
cmd='CMD ["/bin/sh", "-c", "trap \"exit 0\" TERM; while :; do sleep 3600 & wait $!; done"]'
if [ -z "${SKIP_PODMAN:-}" ] && command -v podman >/dev/null; then
  podman import --change "$cmd" --change 'WORKDIR /workspace' --change 'ENV PATH=/bin' \
    "$work/rootfs.tar" "$image" >/dev/null
  echo "podman image $image"
fi
if [ -n "${DOCKER_HOST:-}" ] && command -v docker >/dev/null; then
  docker import --change "$cmd" --change 'WORKDIR /workspace' --change 'ENV PATH=/bin' \
    "$work/rootfs.tar" "$image" >/dev/null
  echo "docker image $image"
fi
