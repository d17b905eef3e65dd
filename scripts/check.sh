#!/usr/bin/env bash
# The quick check, for any machine and any user: format, lint, types and the unit layer
# (tests/unit: no NATS, no engine, no root). It installs no engine and needs no root; it makes
# the project's venv with scripts/venv.sh when there is none (or pyproject.toml changed since).
# Stops at the first failure, with its exit status. Extra args go to pytest.
# The whole suite, engines included, is scripts/test.sh (root), which is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

stamp=.venv/.check-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  step "venv (scripts/venv.sh)"
  bash scripts/venv.sh
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"

# The AsyncAPI 3 JSON Schema the contract test validates against, from the npm registry, where
# npm is at hand (no root needed); without it that one test is skipped and says so.
schema=.cache/asyncapi/node_modules/@asyncapi/specs/schemas/3.0.0.json
if [ ! -f "$schema" ] && command -v npm >/dev/null; then
  step "AsyncAPI schema (npm)"
  npm install --silent --no-audit --no-fund --prefix .cache/asyncapi @asyncapi/specs@6
fi

step "format (ruff format --check)"
ruff format --check .
step "lint (ruff check)"
ruff check .
step "types (mypy)"
mypy
step "unit tests (pytest -m unit)"
pytest -m unit "$@"
