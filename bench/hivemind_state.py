"""hivemind's ``load_state_from_peers`` on the same synthetic state, for ``bench/join.py --vs-hivemind``.
Runs under a Python that has hivemind 1.1.12 installed.

    hivemind_state.py donor --size-mb S [--initial-peers ...]   # prints {"initial_peers": [...]} when serving
    hivemind_state.py joiner --size-mb S --initial-peers ...    # prints {"seconds": ..., "ok": ...}
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager

PREFIX = "legionjoin"


def state(size_mb: float, seed: int) -> list[torch.Tensor]:
    """The tensors ``swarm.state_node.synthetic_state`` makes (weights, momentum)."""
    half = int(size_mb * (1 << 20) / 8)
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(half, generator=generator), torch.randn(half, generator=generator) * 1e-3]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["donor", "joiner"])
    parser.add_argument("--size-mb", type=float, required=True)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    args = parser.parse_args()
    dht = hivemind.DHT(start=True, initial_peers=args.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    if args.role == "donor":
        averager = DecentralizedAverager(state(args.size_mb, 0), dht=dht, prefix=PREFIX, start=True,
                                         allow_state_sharing=True, declare_state_period=1.0, target_group_size=2)
        print(json.dumps({"initial_peers": [str(a) for a in dht.get_visible_maddrs()]}), flush=True)

        def leave(*_) -> None:  # SIGTERM: stop hivemind's daemons too (a SIGKILL would orphan them)
            averager.shutdown()
            dht.shutdown()
            sys.exit(0)

        signal.signal(signal.SIGTERM, leave)
        time.sleep(3600)
    else:
        expected = state(args.size_mb, 0)
        averager = DecentralizedAverager([torch.zeros_like(t) for t in expected], dht=dht, prefix=PREFIX,
                                         start=True, allow_state_sharing=False, target_group_size=2)
        time.sleep(2.0)  # let the donors' state declarations reach this DHT node
        began = time.perf_counter()
        loaded = averager.load_state_from_peers(timeout=600)
        seconds = time.perf_counter() - began
        ok = loaded is not None and all(torch.equal(a, b) for a, b in zip(loaded[1], expected))
        print(json.dumps({"seconds": seconds, "ok": ok}), flush=True)
        averager.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
