"""Shard benchmark: N training peers (processes on 127.0.0.1, the tiny GPT) with the outer
momentum sharded, against the same run unsharded.

    python bench/shards.py --peers 4 [--rounds 4] [--json]

1. The same short DiLoCo run (outer momentum 0.9, fp32 averaging, no overlap, fixed peer
   identities so every peer reads the same batches in both runs) trains sharded and unsharded;
   ``max_param_diff_vs_unsharded`` compares the final weights (``--noise-floor``: and two unsharded
   runs, whose all-reduce sums in arrival order too), ``state_fraction`` is the largest outer state
   one peer held over the whole state (1.0 unsharded), ``bytes_per_peer_per_round`` what a peer
   sent and received in the all-reduce (sharded, the owners' steps travel in it).
2. Ownership: N sharded peers train on; a new peer joins, then one is killed with SIGKILL. A
   reader polls ``legion-peer status --shards --json`` and times how long until the joiner owns
   shards (from its launch: start-up and loading the corpus included) and until no shard names the
   dead peer; ``converge_seconds`` is the longer of the two.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for report.py; last, or bench/dht.py would shadow the dht package

from report import print_result  # noqa: E402
from swarm.local import PeerProcess, start_peer_process, start_training_swarm, status_json, training_summary  # noqa: E402
from swarm.run_config import RunConfig  # noqa: E402


def run_args(args: argparse.Namespace, sharded: bool) -> list[str]:
    return ["--model", "tiny", "--inner-steps", "5", "--batch-size", "4", "--rounds", str(args.rounds),
            "--outer-momentum", "0.9", "--outer-lr", "0.7", "--codec", args.codec, "--no-overlap",
            *(["--sharded"] if sharded else [])]


def start_swarm(work: Path, tag: str, run: list[str], peers: int, heartbeat: float) -> list[PeerProcess]:
    """A seed publishing ``run`` and ``peers - 1`` peers, each with a fixed identity from ``work``."""
    return start_training_swarm(peers, run, work / tag, heartbeat=heartbeat, extra=["--quiet"], identities=work,
                                timeout=120)


def final_weights(work: Path, tag: str) -> dict:
    return torch.load(work / tag / "peer0" / "model.pt")


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def equivalence(args: argparse.Namespace, work: Path) -> dict:
    results = {}
    runs = [("sharded", True), ("unsharded", False)] + ([("unsharded-again", False)] if args.noise_floor else [])
    for tag, sharded in runs:
        processes = start_swarm(work, tag, run_args(args, sharded), args.peers, args.heartbeat)
        try:
            results[tag] = [training_summary(p, 600) for p in processes]
        finally:
            for p in processes:
                p.kill()
    total = RunConfig(model="tiny").model_config().num_params() * 4
    diff = max_diff(final_weights(work, "sharded"), final_weights(work, "unsharded"))
    floor = {"max_param_diff_unsharded_twice": max_diff(final_weights(work, "unsharded"),
                                                         final_weights(work, "unsharded-again"))} \
        if args.noise_floor else {}
    return {**floor, "replicas": RunConfig().replicas, "shards": RunConfig().shards,
            "state_fraction": round(max(s["outer_state_bytes"] for s in results["sharded"]) / total, 4),
            "state_fraction_unsharded": round(max(s["outer_state_bytes"] for s in results["unsharded"]) / total, 4),
            "state_bytes_per_peer": sorted(s["outer_state_bytes"] for s in results["sharded"]),
            "max_param_diff_vs_unsharded": diff,
            "val_loss": {tag: round(results[tag][0]["val_loss"], 6) for tag in results},
            "bytes_per_peer_per_round": {tag: round(statistics.mean(s["bytes_sent"] + s["bytes_received"]
                                                                    for s in results[tag]) / args.rounds)
                                         for tag in results},
            "momentum_lost": sum(s["momentum_lost"] for s in results["sharded"]),
            "rounds_failed": sum(s["rounds_failed"] for s in results["sharded"] + results["unsharded"])}


def owners(bootstrap: str) -> set[str]:
    runs = status_json(bootstrap, "--shards")
    return {o["peer_id"] for run in runs for shard in run["shards"] for o in shard["owners"]}


class NotConverged(Exception):
    pass


def wait_until(predicate, timeout: float, what: str) -> float:
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise NotConverged(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - began


def ownership(args: argparse.Namespace, work: Path) -> dict:
    run = [*run_args(args, True), "--rounds", "0"]  # trains until killed
    processes = start_swarm(work, "ownership", run, args.peers, args.heartbeat)
    seed = processes[0].addrs[0]
    timeout = max(120.0, 30 * args.heartbeat, 15.0 * args.peers)  # many peers on 2 cores read the DHT slowly
    try:
        wait_until(lambda: owners(seed) >= {p.peer_ids[0] for p in processes}, timeout, "every peer owning shards")
        began = time.monotonic()
        joiner = start_peer_process(["--bootstrap", seed, "--listen", "/ip4/127.0.0.1/tcp/0", "--heartbeat",
                                     str(args.heartbeat), "--threads", "1", "--quiet"], log_dir=work / "ownership" / "logs")
        processes.append(joiner)
        wait_until(lambda: joiner.peer_ids[0] in owners(seed), timeout, "the joiner owning shards")
        join_seconds = time.monotonic() - began
        victim = processes[1]
        victim.kill()
        death_seconds = wait_until(lambda: victim.peer_ids[0] not in owners(seed), timeout, "the killed peer's shards moving")
    finally:
        for p in processes:
            p.kill()
    return {"converge_seconds": round(max(join_seconds, death_seconds), 2),
            "converge_seconds_join": round(join_seconds, 2), "converge_seconds_death": round(death_seconds, 2),
            "lease_seconds": args.heartbeat * 2.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--codec", default="none", help="averaging codec (fp32 by default: comparable runs)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--noise-floor", action="store_true",
                        help="also run the unsharded run twice: how far two identical runs differ")
    parser.add_argument("--heartbeat", type=float, default=2.0,
                        help="peers' heartbeat (s): the lease is 2.5 of them; every peer reads and writes the DHT "
                             "each heartbeat, so many peers on few cores need a longer one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="legion-bench-shards-"))
    result = {"peers": args.peers, "rounds": args.rounds}
    try:
        result.update(equivalence(args, work))
        try:
            result.update(ownership(args, work))
        except NotConverged as exc:  # the equivalence figures still stand
            result["converge_seconds"], result["ownership_error"] = None, str(exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_result(result, args.json)


if __name__ == "__main__":
    main()
