"""More DiLoCo peers than a group holds: a swarm trained in groups of G (two-level rounds, each
cell reduced across the round's groups) beside the same swarm in one group of all its peers.

    python bench/groups.py [--peers 6] [--group-size 3] [--rounds 8] [--inner-steps 5] [--sharded]
                           [--groups-only] [--keep DIR] [--json]

Per run: the fraction of peer-rounds averaged, rounds failed, the peers that ended with weights of
their own (the others adopted the weights most held: with one set of weights all keep their own),
the cells reduced across groups and those a group reduced alone, the final validation loss and the
wall time; with ``--sharded`` (outer momentum held by each shard's owners, every shard reduced
across the round's groups), the shard-rounds whose momentum was lost. Both runs train the tiny GPT
on the embedded corpus on this machine's loopback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.local import training_summary, start_training_swarm  # noqa: E402


def train(peers: int, group_size: int, args: argparse.Namespace, work: Path) -> dict:
    """One swarm of ``peers`` trained to the end in groups of ``group_size``: what it reports."""
    work.mkdir(parents=True)
    run = work / "run.toml"
    run.write_text(f'model = "tiny"\ninner_steps = {args.inner_steps}\nbatch_size = 8\nrounds = {args.rounds}\n'
                   f'round_timeout = {args.round_timeout}\ngroup_size = {group_size}\n'
                   + ("sharded = true\n" if args.sharded else ""))
    started = time.monotonic()
    processes = start_training_swarm(peers, ["--run", str(run)], work)
    try:
        with ThreadPoolExecutor(peers) as pool:
            summaries = list(pool.map(lambda p: _summary(p, 60 * args.rounds), processes))
    finally:
        for process in processes:
            process.kill()
    logs = "".join(path.read_text(errors="replace") for path in (work / "logs").glob("*.log"))
    done = [s for s in summaries if "error" not in s]
    return {
        "peers": peers, "group_size": group_size, "seconds": round(time.monotonic() - started, 1),
        "rounds_averaged_fraction": sum(s["rounds_averaged"] for s in done) / (peers * args.rounds),
        "rounds_failed": sum(s["rounds_failed"] for s in done),
        "own_final_weights": sum(s["final_weights"] == "own" for s in done),
        "cells_across_groups": len(re.findall(r"cell \d+ reduced across", logs)),
        "cells_within_a_group": len(re.findall(r"cell \d+ reduced in this group only", logs)),
        "lineage_moves": len(re.findall(r'"event": "lineage"', "".join(
            path.read_text(errors="replace") for path in work.glob("*/metrics.jsonl")))),
        **({"momentum_lost": sum(s.get("momentum_lost", 0) for s in done)} if args.sharded else {}),
        "val_loss": max((s["val_loss"] for s in done), default=None),
        "errors": [s["error"] for s in summaries if "error" in s],
    }


def _summary(process, timeout: float) -> dict:
    try:
        return training_summary(process, timeout)
    except Exception as exc:  # a peer that exited loudly (trained alone, say) is reported, not fatal
        return {"error": str(exc)[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=6)
    parser.add_argument("--group-size", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--round-timeout", type=float, default=40.0)
    parser.add_argument("--sharded", action="store_true", help="sharded outer momentum (run key sharded)")
    parser.add_argument("--groups-only", action="store_true", help="no run in one group beside it")
    parser.add_argument("--keep", type=Path, help="keep the peers' logs and metrics here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [args.group_size] if args.groups_only else [args.group_size, args.peers]
    with tempfile.TemporaryDirectory(prefix="legion-groups-") as tmp:
        work = args.keep or Path(tmp)
        runs = [train(args.peers, size, args, work / f"groups-of-{size}") for size in sizes]
    if args.json:
        print(json.dumps(dict(zip(("groups", "one_group"), runs))))
        return
    for name, run in zip(("groups", "one group"), runs):
        print(f"{name:9} ({run['peers']} peers, groups of {run['group_size']}): "
              f"{run['rounds_averaged_fraction']:.3f} of peer-rounds averaged, {run['rounds_failed']} failed, "
              f"{run['own_final_weights']} kept their own weights, cells across groups {run['cells_across_groups']} "
              f"(within one {run['cells_within_a_group']}), lineage moves {run['lineage_moves']}, "
              + (f"momentum lost {run['momentum_lost']}, " if args.sharded else "")
              + f"val loss {run['val_loss']}, {run['seconds']} s"
              + (f", errors: {run['errors']}" if run["errors"] else ""))


if __name__ == "__main__":
    main()
