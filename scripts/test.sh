#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
# The pytest executable (not `python -m pytest`, which puts the source tree first on sys.path) with
# --import-mode=importlib (pyproject.toml) imports the installed package, compiled extension included.
exec pytest "$@"
