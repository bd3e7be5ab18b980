"""One hivemind DecentralizedAverager peer doing the same work as an ``averaging.worker``, for
``bench/allreduce.py --vs-hivemind``. Runs under a Python that has hivemind 1.1.12 installed.

Prints ``{"initial_peers": [...]}`` when ready, then one JSON line per round with the seconds its
all-reduce phase took (matchmaking excluded, as for Legion).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import hivemind
import numpy as np
import torch
from hivemind.averaging import DecentralizedAverager

_original = DecentralizedAverager._aggregate_with_group


async def _timed_aggregate(self, *args, **kwargs):
    """Time hivemind's all-reduce phase; this runs in the averager's own process."""
    started = time.perf_counter()
    result = await _original(self, *args, **kwargs)
    self._legion_round = getattr(self, "_legion_round", -1) + 1
    print(json.dumps({"round": self._legion_round, "allreduce_seconds": time.perf_counter() - started}), flush=True)
    return result


DecentralizedAverager._aggregate_with_group = _timed_aggregate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    args = parser.parse_args()
    dht = hivemind.DHT(start=True, initial_peers=args.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    tensor = torch.from_numpy(np.random.default_rng(args.seed).standard_normal(args.size).astype(np.float32))
    averager = DecentralizedAverager([tensor], dht=dht, prefix="legionbench", start=True,
                                     target_group_size=args.peers, min_group_size=args.peers,
                                     min_matchmaking_time=2.0, request_timeout=10.0)
    print(json.dumps({"initial_peers": [str(a) for a in dht.get_visible_maddrs()]}), flush=True)
    for _ in range(args.rounds):
        averager.step(timeout=300)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
