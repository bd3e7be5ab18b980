"""The run configuration the attack and chaos benchmarks train: the tiny GPT unless told, batch 8."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_file(args: argparse.Namespace, work: Path) -> Path:
    """``work/run.toml`` from ``args`` (inner_steps, rounds, round_timeout, sharded; model, if given)."""
    path = work / "run.toml"
    path.write_text(f'model = "{getattr(args, "model", "tiny")}"\ninner_steps = {args.inner_steps}\n'
                    f'batch_size = 8\nrounds = {args.rounds}\nround_timeout = {args.round_timeout}\n'
                    f'sharded = {str(args.sharded).lower()}\nouter_momentum = {0.9 if args.sharded else 0.0}\n')
    return path
