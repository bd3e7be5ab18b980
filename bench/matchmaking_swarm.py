"""Matchmaking with real peers: N peers in a few processes on 127.0.0.1 form one swarm and match
into groups, round after round, as a check of the simulator's matchmaking (``scale.py``).

    python bench/matchmaking_swarm.py --peers 64 [--per-process 8] [--rounds 6] [--group 16] [--settle 40] [--json]

A seed peer (``legion-peer --seed --no-train``) and ``--peers`` averaging peers, ``--per-process``
to a process, each a real libp2p host with its DHT node. ``--settle`` seconds after every process is
up (a training run's first round comes after its first inner steps; here, 64 peers' joining lookups
keep both cores busy for tens of seconds), all peers start round r at the same moment (plus up to
``--jitter`` seconds each, as peers finish their inner steps at slightly different times) and
average a small tensor (each its own value, 1000 + its index) under the round's key with the real
matchmaker and all-reduce: with the swarm size given, from twice the group size on they seek in
buckets (``averaging.groups.bucket_count``: 4 buckets at 64 peers and groups of 16).

Reports the fraction of peer-rounds averaged on the first try (in a group of two or more), why the
others failed, group sizes and the time a round took; and checks every averaged result: the
members of a group name the same contributors, and the mean is exactly theirs. Then the
simulator's prediction for the same N (``scale.simulate``, the ``buckets`` protocol, with no entry
missed and with 1% missed).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for report.py, after the packages

READY = "ready"
log = logging.getLogger("bench.matchmaking_swarm")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=64, help="averaging peers (the seed not counted)")
    p.add_argument("--per-process", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--group", type=int, default=16, help="target group size (the reducer's cap)")
    p.add_argument("--period", type=float, default=40.0, help="seconds from one round's start to the next")
    p.add_argument("--jitter", type=float, default=1.0, help="each peer starts a round up to this late")
    p.add_argument("--settle", type=float, default=40.0,
                   help="seconds from the last peer up to round 0 (their joining lookups take both cores of a 2-core machine)")
    p.add_argument("--budget", type=float, default=10.0, help="matchmaking budget (DiLoCo's)")
    p.add_argument("--heartbeat", type=float, default=5.0)
    p.add_argument("--values", type=int, default=1000, help="floats each peer averages")
    p.add_argument("--no-rotation", action="store_true",
                   help="a round's bucket drawn by the round and its key at its own DHT nodes, as before 2026-12-07")
    p.add_argument("--verbose", action="store_true", help="the peers log at INFO (logs kept in the folder reported)")
    p.add_argument("--json", action="store_true")
    # a worker process (started by the controller)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--go", type=Path, help=argparse.SUPPRESS)
    return p


# ----- a worker: ``--count`` peers in one trio loop
async def _worker(args: argparse.Namespace) -> None:
    import torch
    import trio

    from averaging.allreduce import RoundFailed
    from averaging.averager import Averager
    from averaging.groups import rotation_of
    from averaging.matchmaking import MatchmakingFailed
    from swarm.peer import Peer, PeerConfig

    results: list[dict] = []
    async with trio.open_nursery() as nursery:
        peers: list[Peer] = []

        async def start_one() -> None:
            config = PeerConfig(listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[args.bootstrap], heartbeat=args.heartbeat)
            peers.append(await nursery.start(Peer(config).run))

        async with trio.open_nursery() as starting:
            for _ in range(args.count):
                starting.start_soon(start_one)
        averagers = [Averager(peer, target_group_size=args.group, matchmaking_budget=args.budget) for peer in peers]
        for averager in averagers:
            averager.matchmaker.swarm_size = args.peers
        for peer in peers:
            print(f"{READY} {peer.peer_id}", flush=True)
        while not args.go.exists():
            await trio.sleep(0.2)
        start = float(args.go.read_text())
        await trio.sleep(max(0.0, start - time.time()))
        cpu_at_start = time.process_time()

        async def take_part(index: int, peer: Peer, averager: Averager) -> None:
            # values within 2x of each other: the owners clip a contribution above twice the
            # group's median norm (``averaging.allreduce.CLIP_RATIO``), so the mean is exactly theirs
            value, rng = 1000 + args.first + index, random.Random(args.first + index)
            for round_ in range(args.rounds):
                await trio.sleep(max(0.0, start + round_ * args.period + rng.uniform(0, args.jitter) - time.time()))
                began = time.time()
                outcome: dict = {}
                try:
                    result = await averager.all_reduce(
                        [torch.full((args.values,), float(value))], group_key=f"bench-mm/r-{round_}",
                        timeout=args.period / 2, matchmaking_timeout=2 * args.budget,
                        rotation=None if args.no_rotation else rotation_of("bench-mm/r", round_))
                    outcome = {"contributors": sorted(map(str, result.stats.contributors)),
                               "group": result.stats.group_id, "mean": float(result.tensors[0].double().mean()),
                               "spread": float(result.tensors[0].max() - result.tensors[0].min())}
                except (MatchmakingFailed, RoundFailed) as exc:
                    outcome = {"failed": type(exc).__name__, "reason": str(exc)[:160]}
                results.append({"peer": str(peer.peer_id), "value": value, "round": round_,
                                "seconds": round(time.time() - began, 2), **outcome})

        async with trio.open_nursery() as rounds:
            for index, (peer, averager) in enumerate(zip(peers, averagers)):
                rounds.start_soon(take_part, index, peer, averager)
        for result in results:
            print("result " + json.dumps(result), flush=True)
        # the process's CPU seconds from round 0's start (peers up, their swarm formed) to the end
        print("cpu " + json.dumps({"seconds": time.process_time() - cpu_at_start, "wall": time.time() - start,
                                   "peers": len(peers)}), flush=True)
        nursery.cancel_scope.cancel()


# ----- the controller
def check(results: list[dict]) -> dict:
    """The run's figures, and every averaged result checked against its group."""
    value_of = {r["peer"]: r["value"] for r in results}
    averaged = [r for r in results if "contributors" in r and len(r["contributors"]) > 1]
    groups: dict[str, set[tuple[str, ...]]] = {}
    wrong_means = 0
    for r in averaged:
        groups.setdefault(r["group"], set()).add(tuple(r["contributors"]))
        expected = statistics.fmean(value_of[p] for p in r["contributors"])
        if abs(r["mean"] - expected) > 1e-3 * max(1.0, expected) or r["spread"] > 1e-3 * max(1.0, expected):
            wrong_means += 1
            log.warning("round %d: %s averaged %.4f (spread %.4f) with %s, whose mean is %.4f", r["round"], r["peer"][-6:],
                        r["mean"], r["spread"], [value_of[p] for p in r["contributors"]], expected)
    sizes = [len(next(iter(sets))) for sets in groups.values()]
    per_round = Counter(r["round"] for r in averaged)
    rounds = max((r["round"] for r in results), default=-1) + 1
    peers = len(value_of)
    return {
        "peer_rounds": len(results),
        "grouped_first_try": round(len(averaged) / len(results), 4) if results else None,
        "grouped_per_round": [round(per_round[i] / peers, 3) for i in range(rounds)],
        "alone": sum(1 for r in results if "contributors" in r and len(r["contributors"]) <= 1),
        "failures": dict(Counter(r["failed"] + ": " + r["reason"].split(":")[0][:60]
                                 for r in results if "failed" in r).most_common(5)),
        "groups": len(groups), "group_size_median": statistics.median(sizes) if sizes else 0,
        "group_size_min": min(sizes, default=0), "group_size_max": max(sizes, default=0),
        "round_seconds_median": round(statistics.median(r["seconds"] for r in results), 2) if results else None,
        "round_seconds_max": max((r["seconds"] for r in results), default=None),
        "groups_whose_members_disagree": sum(1 for sets in groups.values() if len(sets) > 1),
        "means_wrong": wrong_means,
    }


def main() -> int:
    args = parser().parse_args()
    if args.worker:
        import trio

        from swarm.cli import setup_logging
        setup_logging(0, quiet=not args.verbose)
        trio.run(_worker, args)
        return 0
    import re

    from report import print_result
    from scale import simulate
    from swarm.local import PeerProcessError, start_peer_process, start_process

    logs = Path(tempfile.mkdtemp(prefix="legion-bench-mm-"))
    go = logs / "go"
    processes = []
    try:
        seed = start_peer_process(["--seed", "--listen", "/ip4/127.0.0.1/tcp/0", "--heartbeat", str(args.heartbeat),
                                   "--no-train", "--quiet"], log_dir=logs)
        processes.append(seed)
        counts = [min(args.per_process, args.peers - first) for first in range(0, args.peers, args.per_process)]
        firsts = list(range(0, args.peers, args.per_process))
        own = [a for a in sys.argv[1:] if a != "--json"]

        def launch(first: int, count: int):
            command = [sys.executable, __file__, *own, "--worker", "--bootstrap", seed.addrs[0], "--first", str(first),
                       "--count", str(count), "--go", str(go)]
            return start_process(command, re.compile(f"^{READY} "), count, log_dir=logs, timeout=180)

        began = time.monotonic()
        with ThreadPoolExecutor(len(counts)) as pool:
            workers = list(pool.map(launch, firsts, counts))
        processes += workers
        started_in = time.monotonic() - began
        # the last peers' announcements spread and the joiners' lookups end, then every peer starts round 0
        go.write_text(str(time.time() + args.settle))
        results, cpu = [], []
        for worker in workers:
            try:
                lines = worker.output_lines(timeout=args.rounds * args.period + 120)
            except Exception as exc:
                raise PeerProcessError(f"a worker did not finish: {exc}\n{worker.log_tail()}") from exc
            results += [json.loads(line[len("result "):]) for line in lines if line.startswith("result ")]
            cpu += [json.loads(line[len("cpu "):]) for line in lines if line.startswith("cpu ")]
        result = {"peers": args.peers, "processes": len(workers), "rounds": args.rounds, "group": args.group,
                  "settle_seconds": args.settle,
                  "seconds_to_start_the_peers": round(started_in, 1), **check(results),
                  "cpu_cores_per_peer": round(sum(c["seconds"] / c["wall"] for c in cpu) / args.peers, 4) if cpu else None}
        result["simulator"] = {f"miss_{miss}": simulate("buckets", args.peers, miss, 20, args.peers, seed=1)["grouped_first_try"]
                               for miss in (0.0, 0.01)}
        result["logs"] = str(logs)
    finally:
        for process in processes:
            process.kill()
    print_result(result, args.json)
    return 0 if result["groups_whose_members_disagree"] == 0 and result["means_wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
