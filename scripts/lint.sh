#!/usr/bin/env bash
# Lint (ruff) and type check (mypy) with the tools of the venv that scripts/setup.sh made; non-zero on any finding.
# Configuration: [tool.ruff] and [tool.mypy] in pyproject.toml. mypy reads the gRPC stubs that the build generates
# into rag_service/pb/rag/, so run scripts/setup.sh (or `python scripts/gen_protos.py`) first in a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
status=0
ruff check . || status=1
mypy rag_service || status=1
exit "$status"
