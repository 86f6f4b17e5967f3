#!/usr/bin/env bash
# Set everything up on a fresh machine and run the main job end to end on the
# embedded server: export, serve, index sample audio, query a clip, stop.
# Options are passed to scripts/demo.py (see --help), e.g. --size tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
exec python scripts/demo.py "$@"
