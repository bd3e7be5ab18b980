"""Synchronous data parallelism: every step the gradients are averaged with the group (weighted by
samples), then every peer applies the same inner optimizer step."""

from __future__ import annotations

from typing import Iterable

import torch

from optim.base import Reducer, SwarmOptimizer, assign_flat, check_optimizer_tensors, check_state, flatten, \
    load_optimizer_tensors, optimizer_tensors


class SyncOptimizer(SwarmOptimizer):
    algorithm = "sync"

    def __init__(self, params: Iterable[torch.Tensor], inner: torch.optim.Optimizer, reducer: Reducer, *,
                 codec: str = "none") -> None:
        super().__init__(params, reducer)
        self.inner, self.codec = inner, codec
        self.take_snapshot()

    def step(self, samples: int) -> bool:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        reduced = self._reduce_blocking(grads, samples, self.codec, f"sync-{self.round}")
        if reduced is not None:
            with torch.no_grad():
                for p, g in zip(self.params, reduced.tensors):
                    p.grad = g.to(p.device, p.dtype).reshape(p.shape)
        self.inner.step()
        self.round += 1
        self.take_snapshot()
        return True

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": flatten(self.params), **optimizer_tensors(self.inner, "inner")}

    def load_state(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        check_state(state, {"weights": torch.Size([sum(p.numel() for p in self.params)])})
        check_optimizer_tensors(self.inner, "inner", state)
        assign_flat(self.params, state["weights"])
        load_optimizer_tensors(self.inner, "inner", state)
        self._now_at(round_)
