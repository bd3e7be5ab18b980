"""Convergence benchmark: the same data and the same total number of samples trained three ways.

    python bench/convergence.py --peers 4 [--quick] [--repeats K] [--diloco CODEC:H ...] [--data PATH] [--json]

(a) baseline: one process, the combined batch (peers x batch) for S steps;
(b) Legion synchronous: N peer processes averaging fp32 gradients every step, S steps;
(c) Legion DiLoCo: N peer processes, compressed pseudo-gradients every H steps, S steps; by default
int8 every 30 steps and sign1 (1 bit and a block scale, with error feedback) every 4, each about the
most often its codec can average within 100x fewer bytes than (b).
Validation loss is measured on the same fixed held-out batches in all three. bytes_ratio is the
bytes a synchronous fp32 peer sends over the bytes a DiLoCo peer sends. Single runs at a few hundred
steps differ by several percent with the batch order alone; ``--repeats K`` averages K runs of each.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from averaging.codecs import get_codec  # noqa: E402
from optim.data import load_corpus  # noqa: E402
from optim.model import GPT  # noqa: E402
from optim.schedule import lr_factor  # noqa: E402
from report import print_result  # noqa: E402
from swarm.local import start_training_swarm, training_summary  # noqa: E402
from swarm.run_config import RunConfig  # noqa: E402
from swarm.trainer import evaluate  # noqa: E402


def baseline(config: RunConfig, peers: int, steps: int, data: str | None, order: int = 0) -> dict:
    """The single-process reference: AdamW on batches of peers x batch_size, drawn in batch
    order ``order``."""
    torch.set_num_threads(2)
    corpus = load_corpus(data)
    torch.manual_seed(config.seed)
    model = GPT(config.model_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.inner_lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    block, batch = config.model_config().block_size, config.batch_size * peers
    began = time.monotonic()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = config.inner_lr * lr_factor(config.lr_schedule, step / steps)
        x, y = corpus.batch("train", batch, block, f"baseline{order or ''}/{step}".encode())
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.monotonic() - began
    return {"val_loss": evaluate(model, corpus, config.eval_batches, config.batch_size),
            "bytes_sent_per_peer": 0, "seconds": round(seconds, 1),
            "samples_per_second": round(steps * batch / seconds, 1)}


def swarm(peers: int, run_args: list[str], data: str | None, timeout: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix="legion-convergence-"))
    extra = ["--quiet"] + (["--data", data] if data else [])
    processes = start_training_swarm(peers, run_args, out, extra=extra)
    try:
        summaries = [training_summary(p, timeout) for p in processes]
    finally:
        for process in processes:
            process.kill()
    return {"val_loss": statistics.mean(s["val_loss"] for s in summaries),
            "val_loss_spread": max(s["val_loss"] for s in summaries) - min(s["val_loss"] for s in summaries),
            "bytes_sent_per_peer": round(statistics.mean(s["bytes_sent"] for s in summaries)),
            "seconds": round(max(s["seconds"] for s in summaries), 1),
            "samples_per_second_per_peer": round(statistics.mean(s["samples_per_second"] for s in summaries), 1),
            "wait_fraction": round(statistics.mean(s["wait_fraction"] for s in summaries), 3),
            "rounds_averaged": [s["rounds_averaged"] for s in summaries]}


def diloco_run(text: str) -> tuple[str, int]:
    codec, _, inner = text.rpartition(":")
    if not codec or not inner.isdigit() or int(inner) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not CODEC:H (say int8:30)")
    try:
        get_codec(codec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return codec, int(inner)


def combined(runs: list[dict]) -> dict:
    """Runs of one kind as one: the mean of every figure, and each run's validation loss."""
    if len(runs) == 1:
        return runs[0]
    out = {key: round(statistics.mean(run[key] for run in runs), 4) for key, value in runs[0].items()
           if isinstance(value, (int, float))}
    return {**out, "val_losses": [round(run["val_loss"], 4) for run in runs],
            **({"rounds_averaged": [run["rounds_averaged"] for run in runs]} if "rounds_averaged" in runs[0] else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="local steps per peer (S)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per peer per step (the baseline: peers x this)")
    parser.add_argument("--data")
    parser.add_argument("--quick", action="store_true", help="S=200 (and int8 at H=29: 7 rounds, the most within "
                                                                 "100x fewer bytes than sync)")
    parser.add_argument("--diloco", action="append", type=diloco_run, metavar="CODEC:H",
                        help="a DiLoCo run's codec and H, repeatable; the first is reported as 'diloco' "
                             "(default: int8:30 and sign1:4; int8:29 with --quick)")
    parser.add_argument("--lr-schedule", default="constant", help="inner learning-rate schedule of every run")
    parser.add_argument("--inner-lr", type=float, help="inner learning rate of every run (default: the run's)")
    parser.add_argument("--outer-lr", type=float, help="DiLoCo outer learning rate (default: the run's)")
    parser.add_argument("--outer-momentum", type=float, help="DiLoCo outer momentum (default: the run's)")
    parser.add_argument("--no-overlap", action="store_true", help="DiLoCo waits for each round's averaging")
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each kind, averaged (the baseline's k-th in batch order k; the peers' "
                             "orders follow from their ids, new every run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    steps = 200 if args.quick else args.steps
    runs = args.diloco or [("int8", 29 if args.quick else 30), ("sign1", 4)]
    config = RunConfig(model=args.model, lr_schedule=args.lr_schedule, rounds=steps, batch_size=args.batch_size,
                       **({"inner_lr": args.inner_lr} if args.inner_lr else {})).validate()
    every_run = ["--model", args.model, "--lr-schedule", args.lr_schedule, "--inner-lr", str(config.inner_lr),
                 "--batch-size", str(config.batch_size)]
    result: dict = {"peers": args.peers, "steps": steps, "model": args.model}
    repeats = range(max(1, args.repeats))
    result["baseline"] = combined([baseline(config, args.peers, steps, args.data, k) for k in repeats])
    base = result["baseline"]["val_loss"]
    if not args.skip_sync:
        sync_args = every_run + ["--algorithm", "sync", "--codec", "none", "--rounds", str(steps)]
        result["sync"] = combined([swarm(args.peers, sync_args, args.data, timeout=30 * steps) for _ in repeats])
        result["sync_vs_baseline"] = round(result["sync"]["val_loss"] / base, 4)
    diloco = []
    for codec, inner in runs:
        rounds = math.ceil(steps / inner)
        diloco_args = every_run + ["--algorithm", "diloco", "--codec", codec,
                                   "--inner-steps", str(inner), "--rounds", str(rounds)]
        for flag, value in (("--outer-lr", args.outer_lr), ("--outer-momentum", args.outer_momentum)):
            if value is not None:
                diloco_args += [flag, str(value)]
        if args.no_overlap:
            diloco_args.append("--no-overlap")
        run = {"codec": codec, "inner_steps": inner, "rounds": rounds,
               **combined([swarm(args.peers, diloco_args, args.data, timeout=60 * rounds + 600) for _ in repeats])}
        run["vs_baseline"] = round(run["val_loss"] / base, 4)
        if "sync" in result:
            run["bytes_ratio"] = round(result["sync"]["bytes_sent_per_peer"] / max(1, run["bytes_sent_per_peer"]), 1)
        diloco.append(run)
    result["diloco"] = diloco[0]
    result["diloco_vs_baseline"] = diloco[0]["vs_baseline"]
    if "sync" in result:
        result["bytes_ratio"] = diloco[0]["bytes_ratio"]
    if len(diloco) > 1:
        result["diloco_variants"] = diloco[1:]
    print_result(result, args.json)


if __name__ == "__main__":
    main()
