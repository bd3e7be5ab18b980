#!/usr/bin/env bash
# Creates .venv and installs Legion into it (editable, with test extras). Re-runs are cheap: the
# install is skipped while setup.cfg is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v python3.11 || command -v python3)
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.legion-installed
want=$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 2>&1 \
        | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 \
        | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import swarm.trainer, dht, bootstrap, shards.outer, averaging.averager, optim.diloco, zstandard, libp2p, trio, torch, matplotlib, pytest_trio, hypothesis, swarm.web, swarm.metrics, playwright.sync_api"
    echo "$want" > "$stamp"
fi
