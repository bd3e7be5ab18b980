#!/usr/bin/env bash
# The main job: set up, then run a local swarm on 127.0.0.1 (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/legion-peer demo "$@"
