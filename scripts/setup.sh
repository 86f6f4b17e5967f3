#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install the project with the
# extras needed to export, serve and test on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The CPU build of torch, pinned, before anything that could pull a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[cpu,export,server,service,parquet,dev]" --config-settings editable_mode=strict
