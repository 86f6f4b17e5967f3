#!/usr/bin/env bash
# Set up the environment, run the static checks, then the test suite
# (slow cases: scripts/test.sh -m slow; arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The search page's browser test (tests/test_service_page.py) drives Debian's
# headless Chromium; in CI (CI=true) it fails without it.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
    fi
fi
# Real music for the identification tests (tests/test_identification.py): Debian's
# freedroidrpg-data, never committed; apt's package lists are fetched once if absent.
MUSIC="${MERT_INDEXER_MUSIC:-data/music}"
if ! ./scripts/get_music.sh "$MUSIC"; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && ./scripts/get_music.sh "$MUSIC"
    fi
fi
export MERT_INDEXER_MUSIC="$MUSIC"
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
echo "== ruff check, ruff format --check"
ruff check .
ruff format --check .
echo "== mypy"
mypy -p mert_indexer
mypy export
echo "== pytest"
exec python -m pytest -ra "$@"
