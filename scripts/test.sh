#!/usr/bin/env bash
# Set up, then run the test suite (real peer processes on 127.0.0.1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider --durations=10 "$@"
