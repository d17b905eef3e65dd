#!/usr/bin/env bash
# The run command: from a fresh Debian machine to a running sandboxctl on its
# embedded defaults (a nats-server of its own, SQLite, podman). It installs and
# configures the engines, makes the venv, builds the offline busybox image so
# there is something to run, and starts `sandboxctl up` (extra args go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-engines.sh
bash scripts/venv.sh
bash scripts/build-test-image.sh
echo "try, in another shell: .venv/bin/sandboxctl create demo --image localhost/sandboxctl-busybox:latest"
exec .venv/bin/sandboxctl up "$@"
