#!/usr/bin/env bash
# The GPU acceptance check (tools/gpu_check.py): one command, under 10 minutes on one GPU, one table.
# Without CUDA it prints what it would run and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" tools/gpu_check.py "$@"
