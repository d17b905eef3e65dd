#!/usr/bin/env bash
# Makes (or refreshes) the project's virtualenv in .venv, with the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
