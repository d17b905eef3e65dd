#!/usr/bin/env bash
# Builds the images compose.yaml runs, with no registry: a Debian base made from Debian packages
# (mmdebstrap into a tarball, imported), and the sandboxctl image built on it from this
# checkout's wheel and its dependencies' wheels (scripts/Containerfile).
#
#   bash scripts/build-images.sh            # into podman
#   ENGINE=docker bash scripts/build-images.sh   # into the docker daemon of DOCKER_HOST
#
# The base tarball is cached (SANDBOXCTL_CACHE, default ~/.cache/sandboxctl), keyed by what goes
# into it, so only the first build reaches the Debian mirror. Prints the two image names.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${ENGINE:-podman}
suite=${SANDBOXCTL_BASE_SUITE:-bookworm}
mirror=${SANDBOXCTL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=localhost/sandboxctl-base:$suite
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
image=${SANDBOXCTL_IMAGE:-localhost/sandboxctl:$version}
python=${PYTHON:-.venv/bin/python}
packages=python3,python3-venv,ca-certificates,tini
cache=${SANDBOXCTL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandboxctl}

case "$engine" in
  podman | docker) ;;
  *) echo "ENGINE must be podman or docker, not $engine" >&2; exit 2 ;;
esac
command -v "$engine" >/dev/null || { echo "$engine is not installed" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Runs a step with its output kept, shown only if it fails.
quietly() { "$@" >"$work/step.log" 2>&1 || { cat "$work/step.log" >&2; echo "failed: $*" >&2; exit 1; }; }

# 1. The base: Debian's own packages, no apt in the image (minbase), no docs.
key=$(printf '%s %s %s %s' "$suite" "$mirror" "$packages" "$(uname -m)" | sha256sum | cut -c1-16)
tarball=$cache/base-$suite-$key.tar
if ! "$engine" image inspect "$base" >/dev/null 2>&1; then
  if [ ! -s "$tarball" ]; then
    if ! command -v mmdebstrap >/dev/null; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq mmdebstrap >/dev/null
    fi
    mkdir -p "$cache"
    quietly mmdebstrap --variant=minbase --include="$packages" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      "$suite" "$work/base.tar" "$mirror"
    mv "$work/base.tar" "$tarball"
  fi
  quietly "$engine" import --change 'CMD ["/bin/sh"]' "$tarball" "$base"
fi

# 2. The wheels: sandboxctl's own, and its dependencies' built for the base's Python (which may
# not be the Python this script runs), so the image installs them with no index.
target=$("$engine" run --rm --network none "$base" python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
mkdir -p "$work/wheels" "$work/src"
# From a copy of the checkout, so the build leaves nothing in it (setuptools' build/).
tar -C . --exclude=./.venv --exclude=./.git --exclude=./.cache --exclude=./build --exclude='*.egg-info' -cf - . |
  tar -C "$work/src" -xf -
quietly "$python" -m pip wheel --no-deps --wheel-dir "$work/wheels" "$work/src"
quietly "$python" -m pip download --dest "$work/wheels" --find-links "$work/wheels" \
  --only-binary=:all: --python-version "$target" --implementation cp \
  --platform "manylinux_2_28_$(uname -m)" --platform "manylinux_2_17_$(uname -m)" \
  --platform "manylinux2014_$(uname -m)" --platform "linux_$(uname -m)" \
  sandboxctl
cp scripts/Containerfile "$work/Containerfile"

# 3. The sandboxctl image, built with no network: everything it installs is in the context.
quietly "$engine" build --network none --build-arg "BASE=$base" -t "$image" -t localhost/sandboxctl:latest \
  -f "$work/Containerfile" "$work"
echo "$base"
echo "$image"
