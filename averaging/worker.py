"""A peer process that averages synthetic vectors, for the tests and ``bench/allreduce.py``.

    python -m averaging.worker --bootstrap MADDR --size N --codec C --rounds R --seed S --out DIR

Each round averages ``standard_normal(N)`` drawn from ``--seed`` (weight ``--weight``) and writes
the result to ``DIR/<peer id>-<round>.npy``; one JSON line per round goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import trio

from averaging.allreduce import RoundFailed
from averaging.averager import Averager
from averaging.matchmaking import MatchmakingFailed
from swarm.cli import setup_logging
from swarm.exit_guard import exit_if_stuck
from swarm.local import PeerProcess, start_process
from swarm.peer import Peer, PeerConfig

READY = re.compile(r'^\{"ready": "(\S+)"\}$')


def start_worker(args: list[str], *, prefix: tuple[str, ...] | list[str] = (), log_dir: Path,
                 timeout: float = 120.0) -> PeerProcess:
    """Start ``python -m averaging.worker ARGS`` (after ``prefix``, e.g. a netlab namespace) and wait
    until it has joined; its peer id is in ``peer_ids``."""
    process = start_process([*prefix, sys.executable, "-m", "averaging.worker", *args], READY,
                            log_dir=log_dir, timeout=timeout)
    process.peer_ids.append(READY.match(process.ready_lines[0]).group(1))
    return process


async def run(args: argparse.Namespace) -> None:
    peer = Peer(PeerConfig(listen=[args.listen], bootstrap=args.bootstrap, heartbeat=2.0, lanes=args.lanes,
                           upload_mbps=args.upload_mbps))
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        averager = Averager(peer, target_group_size=args.group_size, min_group_size=args.min_group_size,
                            matchmaking_budget=args.budget, send_concurrency=args.send_concurrency)
        print(json.dumps({"ready": peer.peer_id.to_base58()}), flush=True)
        vector = torch.from_numpy(np.random.default_rng(args.seed).standard_normal(args.size).astype(np.float32))
        if args.poison == "nan":
            vector[::1000] = float("nan")
        elif args.poison == "huge":
            vector *= 1e6
        codecs = args.codec.split(",")
        for round_ in range(args.rounds):
            codec = codecs[round_ % len(codecs)]
            began = trio.current_time()
            try:
                result = await averager.all_reduce([vector], weight=args.weight, codec=codec, timeout=args.timeout)
            except (RoundFailed, MatchmakingFailed) as exc:
                stats = getattr(exc, "stats", None)
                print(json.dumps({"round": round_, "codec": codec, "outcome": "failed", "reason": str(exc),
                                  "seconds": trio.current_time() - began,
                                  "members": stats.members if stats else []}), flush=True)
                continue
            stats = result.stats
            if args.save == "all" or (args.save == "first" and round_ == 0):
                np.save(Path(args.out) / f"{peer.peer_id.to_base58()}-{round_}.npy", result.tensors[0].numpy())
            print(json.dumps({"round": round_, "codec": codec, "outcome": stats.outcome, "members": stats.members,
                              "contributors": stats.contributors, "bytes_sent": stats.bytes_sent,
                              "bytes_received": stats.bytes_received, "phase_seconds": stats.phase_seconds,
                              "seconds": trio.current_time() - began}), flush=True)
        await averager.linger()
        peer.stop()
        exit_if_stuck(10.0)
        with trio.move_on_after(5):
            await peer.stopped.wait()
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", action="append", required=True)
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--codec", default="none", help="a codec, or several separated by commas: one per round")
    parser.add_argument("--poison", choices=["nan", "huge"], help="contribute garbage (tests)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--min-group-size", type=int, default=2)
    parser.add_argument("--budget", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--upload-mbps", type=float)
    parser.add_argument("--no-lanes", dest="lanes", action="store_false", help="libp2p streams only")
    parser.add_argument("--send-concurrency", type=int, default=0,
                        help="owners a member sends contributions to at once in groups this peer leads (0: all)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", choices=["all", "first", "none"], default="all", help="rounds whose result is saved")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    setup_logging(0, args.quiet)
    trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())
