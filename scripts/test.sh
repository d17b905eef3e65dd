#!/usr/bin/env bash
# The test command: from a fresh Debian machine to a full test run. It installs
# and configures the engines, makes the project's venv, builds the offline test
# image, lints, type-checks the core and runs pytest (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-engines.sh
bash scripts/venv.sh
export PATH="$PWD/.venv/bin:$PATH"
bash scripts/build-test-image.sh
ruff check .
mypy
exec pytest "$@"
