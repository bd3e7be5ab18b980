"""What every swarm optimizer shares: the reducer it averages through, flat views of parameters,
and named state tensors for snapshots and transfers.

Swarm optimizers are called from an ordinary (synchronous) torch training loop that runs in a
worker thread (``trio.to_thread.run_sync``); they reach the network on the trio side through
``trio.from_thread``, so torch compute never blocks the event loop."""

from __future__ import annotations

import hashlib

import time
from dataclasses import dataclass
from functools import partial
from typing import Awaitable, Callable, Iterable

import torch
import trio

# (tensors, weight, codec, round key[, plan=]) -> the weighted mean over a group (group_size 1 and
# the tensors themselves when the peer trains alone), or None when others train but no group
# averaged (matchmaking or the round failed): the caller goes on with its own values and is out of
# sync. With a plan (``averaging.averager.RoundPlan``) the result is the plan's transform of the mean.
Reducer = Callable[..., Awaitable["Reduced | None"]]


@dataclass
class Reduced:
    tensors: list[torch.Tensor]
    group_size: int
    bytes_sent: int = 0
    bytes_received: int = 0
    members: tuple[str, ...] = ()  # the peers whose contributions the average holds (sorted)


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])


def assign_flat(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p).to(p.dtype))
            offset += n


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """A torch optimizer's per-parameter state as named tensors (scalars become 0-d tensors)."""
    out = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            out[f"{prefix}.{index}.{name}"] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str, state: dict[str, torch.Tensor]) -> None:
    """Replace a torch optimizer's per-parameter state; ``check_optimizer_tensors`` first."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.state.clear()
    for key, value in state.items():
        if not key.startswith(prefix + "."):
            continue
        index, name = key[len(prefix) + 1:].split(".", 1)
        p = params[int(index)]
        optimizer.state.setdefault(p, {})[name] = value.to(p.device) if name != "step" else value.float()


def check_optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str, state: dict[str, torch.Tensor]) -> None:
    """Every ``prefix.<index>.<name>`` tensor names a parameter and has its shape (or is a scalar)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in state.items():
        if not key.startswith(prefix + "."):
            continue
        index, _, name = key[len(prefix) + 1:].partition(".")
        if not (index.isascii() and index.isdigit()) or int(index) >= len(params) or not name:
            raise StateError(f"state {key} names no parameter")
        if value.dim() != 0 and not value.is_floating_point():
            raise StateError(f"state {key} is not floating point ({value.dtype})")
        if value.dim() != 0 and value.shape != params[int(index)].shape:
            raise StateError(f"state {key} has shape {tuple(value.shape)}, its parameter "
                             f"{tuple(params[int(index)].shape)}")
        if not torch.isfinite(value.float()).all():
            raise StateError(f"state {key} holds NaN or inf")


class StateError(ValueError):
    """A transferred state that does not fit this model and algorithm."""


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    for name, shape in expected.items():
        if name not in state:
            raise StateError(f"state lacks {name}")
        if state[name].shape != shape:
            raise StateError(f"state {name} has shape {tuple(state[name].shape)}, expected {tuple(shape)}")
        if not torch.isfinite(state[name]).all():
            raise StateError(f"state {name} holds NaN or inf")


@dataclass
class OptimizerStats:
    rounds_averaged: int = 0
    rounds_alone: int = 0
    rounds_failed: int = 0
    last_group_size: int = 1
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_seconds: float = 0.0  # training thread blocked on the network

    def record(self, reduced: "Reduced | None") -> None:
        if reduced is None or reduced.group_size == 1:
            self.last_group_size = 1
            if reduced is None:
                self.rounds_failed += 1
            else:
                self.rounds_alone += 1
            return
        self.rounds_averaged += 1
        self.last_group_size = reduced.group_size
        self.bytes_sent += reduced.bytes_sent
        self.bytes_received += reduced.bytes_received


class SwarmOptimizer:
    """Base of the swarm optimizers. ``round`` counts the swarm-wide updates applied so far;
    ``snapshot`` is the state at the last round boundary, what a late joiner downloads."""

    algorithm = ""

    def __init__(self, params: Iterable[torch.Tensor], reducer: Reducer) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters")
        self.reducer = reducer
        self.round = 0
        self.stats = OptimizerStats()
        self.snapshot: tuple[int, dict[str, torch.Tensor]] | None = None
        self.out_of_sync = False  # set when an update was applied without the group

    def _wait_on_network(self, async_fn: Callable[..., Awaitable], *args):
        """From the training thread: run ``async_fn`` on the trio side and wait for it; the time
        counts as waiting on the network."""
        began = time.monotonic()
        try:
            return trio.from_thread.run(async_fn, *args)
        finally:
            self.stats.wait_seconds += time.monotonic() - began

    def _received(self, reduced: "Reduced | None") -> "Reduced | None":
        """Account a round's result; without a group the update that follows is out of sync."""
        self.stats.record(reduced)
        self.out_of_sync |= reduced is None
        return reduced

    def _reduce_blocking(self, tensors: list[torch.Tensor], weight: float, codec: str, key: str,
                         plan: object = None, base: str = "") -> "Reduced | None":
        """From the training thread: average on the trio side and wait for the answer."""
        return self._received(self._wait_on_network(self._reducer_for(plan, base), tensors, weight, codec, key))

    def _reducer_for(self, plan: object, base: str = "") -> Reducer:
        """The reducer, given ``plan`` and ``base`` (as keywords) only where set: a reducer of
        four arguments serves every round without them."""
        options = {name: value for name, value in (("plan", plan), ("base", base)) if value}
        return partial(self.reducer, **options) if options else self.reducer

    def step(self, samples: int) -> bool:
        """One local step after ``backward()``; returns True when the step ended a swarm round."""
        raise NotImplementedError

    @property
    def rounds_begun(self) -> int:
        """Rounds whose local work is done (some may still be averaging)."""
        return self.round

    @property
    def round_progress(self) -> float:
        """Rounds begun plus the fraction of the current round's local work done."""
        return float(self.rounds_begun)

    def set_lr(self, lr: float) -> None:
        """The inner learning rate from the next step on (the trainer's schedule)."""
        for group in self.inner.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def take_snapshot(self) -> None:
        self.snapshot = (self.round, self.state_tensors())

    def _now_at(self, round_: int) -> None:
        """After adopting a peer's state of ``round_``: in sync with the swarm again."""
        self.round = round_
        self.out_of_sync = False
        self.take_snapshot()

    def finish(self) -> None:
        """Wait for averaging still in flight (training is over)."""


def weights_digest(weights: torch.Tensor) -> str:
    """A short digest of a flat float tensor's exact bits."""
    return hashlib.blake2b(weights.detach().cpu().numpy().tobytes(), digest_size=12).hexdigest()
