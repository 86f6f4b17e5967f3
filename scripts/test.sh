#!/usr/bin/env bash
# Set up the environment and run the test suite (slow cases: scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
exec python -m pytest -ra "$@"
