"""The run configuration the attack and chaos benchmarks train: the tiny GPT unless told, batch 8."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_file(args: argparse.Namespace, work: Path) -> Path:
    """``work/run.toml`` from ``args`` (inner_steps, rounds, round_timeout, sharded; model and
    group_size, if given)."""
    path = work / "run.toml"
    group_size = getattr(args, "group_size", None)
    path.write_text(f'model = "{getattr(args, "model", "tiny")}"\ninner_steps = {args.inner_steps}\n'
                    f'batch_size = 8\nrounds = {args.rounds}\nround_timeout = {args.round_timeout}\n'
                    f'sharded = {str(args.sharded).lower()}\nouter_momentum = {0.9 if args.sharded else 0.0}\n'
                    + (f'group_size = {group_size}\n' if group_size else ''))
    return path
