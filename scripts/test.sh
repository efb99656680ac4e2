#!/usr/bin/env bash
# Sets up (scripts/setup.sh), lints and type-checks (scripts/lint.sh), then runs the test suite against the installed
# package; arguments go to pytest. What CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
# The pytest executable (not `python -m pytest`, which puts the source tree first on sys.path) with
# --import-mode=importlib (pyproject.toml) imports the installed package, compiled extension included.
exec pytest "$@"
