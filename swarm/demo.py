"""``legion-peer demo``: a local swarm on 127.0.0.1 (a seed and peers, one process each) trains a
small GPT on the Python standard library's sources, with a live view, then a summary, a loss plot
and a text sample from the trained model."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from optim.data import decode, encode
from optim.model import GPT
from swarm.local import PeerProcess, PeerProcessError, start_training_swarm, training_summary
from swarm.run_config import RunConfig

PROMPT = "def "


def _read_metrics(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _status_lines(outs: list[Path], started: float) -> list[str]:
    lines = [f"  {'peer':<6}{'round':>6}{'step':>6}{'loss':>8}{'val':>7}{'tok/s':>8}{'up MB':>8}{'down MB':>9}{'group':>6}"]
    for i, out in enumerate(outs):
        rows = _read_metrics(out / "metrics.jsonl")
        last = next((r for r in reversed(rows) if r["event"] in ("round", "done")), None)
        if last is None:
            lines.append(f"  {i:<6}{'starting':>6}")
            continue
        if last["event"] == "done":
            lines.append(f"  {i:<6}{last['round']:>6}{last['steps']:>6}{'-':>8}{last['val_loss']:>7.3f}{'-':>8}"
                         f"{last['bytes_sent'] / 1e6:>8.2f}{last['bytes_received'] / 1e6:>9.2f}{'-':>6}  done")
            continue
        lines.append(f"  {i:<6}{last['round']:>6}{last['step']:>6}{last['loss']:>8.3f}{last['val_loss']:>7.3f}"
                     f"{last['tokens_per_second']:>8.0f}{last['bytes_sent'] / 1e6:>8.2f}"
                     f"{last['bytes_received'] / 1e6:>9.2f}{last['group_size']:>6}")
    lines.append(f"  {time.monotonic() - started:.0f}s elapsed")
    return lines


def _show(lines: list[str], previous: int) -> int:
    """On a terminal, redraw the table in place; otherwise print it anew (every 15 s)."""
    if sys.stdout.isatty() and previous:
        print(f"\033[{previous}F\033[J", end="")
    print("\n".join(lines), flush=True)
    return len(lines) if sys.stdout.isatty() else 0


def _plot(outs: list[Path], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, out in enumerate(outs):
        rows = [r for r in _read_metrics(out / "metrics.jsonl") if r["event"] == "round"]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], alpha=0.5, label=f"peer {i} train loss")
    evaluations = {0: None}  # step -> validation loss, at the steps where it was measured
    for r in _read_metrics(outs[0] / "metrics.jsonl"):
        step = {"start": 0, "round": r.get("val_step"), "done": r.get("steps")}.get(r["event"])
        if step is not None:
            evaluations[step] = r["val_loss"]
    points = sorted((step, loss) for step, loss in evaluations.items() if loss is not None)
    ax.plot([p[0] for p in points], [p[1] for p in points], "ko-", lw=2, label="validation loss (peer 0)")
    ax.set_xlabel("local step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title("Legion local swarm: DiLoCo on the Python standard library")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _sample(out: Path, config: RunConfig, tokens: int) -> str:
    torch.manual_seed(0)
    model = GPT(config.model_config())
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    model.eval()
    prompt = torch.from_numpy(encode(PROMPT).astype("int64"))[None, :]
    return decode(model.generate(prompt, tokens, generator=torch.Generator().manual_seed(0))[0].tolist())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="legion-peer demo", description=__doc__)
    parser.add_argument("--peers", type=int, default=4, help="peer processes, the seed included")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=30)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", type=Path, help="directory for logs, metrics, models and the plot")
    parser.add_argument("--dashboard", default="127.0.0.1:0", metavar="HOST:PORT",
                        help="where the seed serves the live swarm dashboard (default: a free port on 127.0.0.1)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="legion-demo-"))
    outs = [out / f"peer{i}" for i in range(args.peers)]
    config = RunConfig(model=args.model, rounds=args.rounds, inner_steps=args.inner_steps).validate()
    processes: list[PeerProcess] = []
    print(f"Legion demo: {args.peers} peers on 127.0.0.1 train a {args.model} GPT with DiLoCo "
          f"({args.rounds} rounds of {args.inner_steps} local steps, int8 pseudo-gradients). Output in {out}")
    try:
        processes = start_training_swarm(args.peers, ["--model", args.model, "--rounds", str(args.rounds),
                                                      "--inner-steps", str(args.inner_steps)], out, extra=["--quiet"],
                                         seed_extra=["--dashboard", args.dashboard])
        print(f"seed {processes[0].addrs[0]}")
        dashboard = next((line.split()[1] for line in processes[0].pending_lines if line.startswith("dashboard ")), None)
        print(f"live dashboard (while the swarm trains): {dashboard}")
        started, shown, last_print = time.monotonic(), 0, 0.0
        while any(p.proc.poll() is None for p in processes):
            now = time.monotonic()
            if sys.stdout.isatty() or now - last_print >= 15:
                shown, last_print = _show(_status_lines(outs, started), shown), now
            time.sleep(1)
        _show(_status_lines(outs, started), shown)
        try:
            summaries = [training_summary(process, 30) for process in processes]
        except PeerProcessError as exc:
            print(f"a peer failed: {exc}")
            return 1
        plot = out / "loss.png"
        _plot(outs, plot)
        first = summaries[0]
        print("\nSummary")
        print(f"  validation loss: {first['initial_val_loss']:.3f} before, "
              f"{min(s['val_loss'] for s in summaries):.3f}-{max(s['val_loss'] for s in summaries):.3f} after "
              f"(nats per byte; ln 256 = 5.545 is a uniform guess)")
        print(f"  last train loss: {_last_loss(outs):.3f}")
        print(f"  {first['round']} rounds in {max(s['seconds'] for s in summaries):.0f}s; per peer: "
              f"{sum(s['steps'] for s in summaries) / len(summaries):.0f} local steps, "
              f"{sum(s['samples_per_second'] for s in summaries) / len(summaries):.1f} samples/s, "
              f"{sum(s['bytes_sent'] for s in summaries) / len(summaries) / 1e6:.2f} MB sent, "
              f"{sum(s['wait_fraction'] for s in summaries) / len(summaries):.1%} of the time waiting on the network")
        print(f"  rounds averaged with others: {[s['rounds_averaged'] for s in summaries]} of {first['round']}")
        print(f"  loss curve: {plot}")
        print(f"  sample from the trained model (prompt {PROMPT!r}):\n")
        print("    " + _sample(outs[0], config, 200).replace("\n", "\n    "))
        return 0
    finally:
        for process in processes:
            process.kill()


def _last_loss(outs: list[Path]) -> float:
    """The mean over peers of each one's train loss in its last round."""
    losses = []
    for out in outs:
        rounds = [r["loss"] for r in _read_metrics(out / "metrics.jsonl") if r["event"] == "round"]
        losses += rounds[-1:]
    return sum(losses) / len(losses) if losses else math.nan
