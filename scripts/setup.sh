#!/usr/bin/env bash
# Creates .venv (or $VENV) and installs rag-service with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: sentence-transformers would otherwise pull a CUDA build of several GB.
python -m pip install -q "torch==2.13.0"
python -m pip install -q ".[test]"
python -I -c "import rag_service._native as n; print('rag_service._native built; HAS_CUDA =', n.HAS_CUDA)"
