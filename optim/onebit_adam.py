"""1-bit Adam (Tang et al., 2021) over the swarm.

During warmup it is Adam on gradients averaged in full precision. Then the second moment is frozen
and only the momentum is averaged, compressed to one sign bit per value with a per-block scale;
the compression error is fed back on both sides (the averager keeps the residuals), so it is
carried into later steps rather than lost. Every peer then applies the same preconditioned step."""

from __future__ import annotations

from typing import Iterable

import torch

from optim.base import Reducer, SwarmOptimizer, assign_flat, check_state, flatten


class OneBitAdam(SwarmOptimizer):
    algorithm = "onebit-adam"

    def __init__(self, params: Iterable[torch.Tensor], reducer: Reducer, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 warmup_steps: int = 100, codec: str = "sign1") -> None:
        super().__init__(params, reducer)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.warmup_steps, self.codec = warmup_steps, codec
        size = sum(p.numel() for p in self.params)
        self.exp_avg, self.exp_avg_sq = torch.zeros(size), torch.zeros(size)
        self.take_snapshot()

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def step(self, samples: int) -> bool:
        grad = flatten(p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params)
        beta1, beta2 = self.betas
        t = self.round + 1
        if self.round < self.warmup_steps:
            reduced = self._reduce_blocking([grad], samples, "none", f"onebit-{self.round}")
            if reduced is not None:
                grad = reduced.tensors[0]
            self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
        else:  # frozen variance; the momentum itself is what travels, one bit per value
            local = self.exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
            reduced = self._reduce_blocking([local], samples, self.codec, f"onebit-{self.round}")
            self.exp_avg = reduced.tensors[0].float() if reduced is not None else local
            bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** min(t, self.warmup_steps)
        weights = flatten(self.params)
        if self.weight_decay:
            weights.mul_(1 - self.lr * self.weight_decay)
        denom = (self.exp_avg_sq / bias2).sqrt_().add_(self.eps)
        weights.addcdiv_(self.exp_avg, denom, value=-self.lr / bias1)
        assign_flat(self.params, weights)
        self.round += 1
        self.take_snapshot()
        return True

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": flatten(self.params), "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}

    def load_state(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        size = torch.Size([len(self.exp_avg)])
        check_state(state, {"weights": size, "exp_avg": size, "exp_avg_sq": size})
        assign_flat(self.params, state["weights"])
        self.exp_avg, self.exp_avg_sq = state["exp_avg"].float().clone(), state["exp_avg_sq"].float().clone()
        self._now_at(round_)
