#!/usr/bin/env bash
# The test command: from a fresh Debian machine to a full test run. It installs
# and configures the engines, makes the project's venv, builds the offline test
# image, lints, type-checks the core and runs pytest (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-engines.sh
bash scripts/setup-vm.sh
bash scripts/venv.sh
export PATH="$PWD/.venv/bin:$PATH"
bash scripts/build-test-image.sh
# The shells whose completion scripts the tests load (bash is there already).
if ! command -v zsh >/dev/null || ! command -v fish >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends zsh fish >/dev/null
fi
# The browser the web console's test drives (tests/e2e/test_console.py): Debian's chromium, headless,
# through chromium-driver.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
# The AsyncAPI 3 JSON Schema the contract test validates against, from the npm registry.
if [ ! -f .cache/asyncapi/node_modules/@asyncapi/specs/schemas/3.0.0.json ]; then
  command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm >/dev/null; }
  npm install --silent --no-audit --no-fund --prefix .cache/asyncapi @asyncapi/specs@6
fi
ruff format --check .
ruff check .
mypy
exec pytest "$@"
