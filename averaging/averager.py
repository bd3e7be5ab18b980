"""``Averager``: the library entry point for averaging torch tensors with peers of a swarm."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import trio

from averaging.allreduce import AllReduce, RoundStats
from averaging.codecs import get_codec
from averaging.matchmaking import Matchmaker

log = logging.getLogger(__name__)


@dataclass
class AveragingResult:
    tensors: list[torch.Tensor]
    stats: RoundStats


class Averager:
    """Weighted averaging of a list of tensors with a group found through the DHT.

    ``peer`` is a running ``swarm.peer.Peer``. Error-feedback residuals are kept per tensor layout
    and codec, so a lossy codec's error is carried into the next round rather than lost.
    ``send_concurrency`` (set in the groups this peer leads): how many owners a member sends its
    contributions to at once, 0 for all (see ``AllReduce.run``); 1 where CPU is short.
    """

    def __init__(self, peer, *, target_group_size: int = 8, min_group_size: int = 2,
                 matchmaking_budget: float = 5.0, max_norm_ratio: float = 100.0, send_concurrency: int = 0) -> None:
        self.allreduce = AllReduce(peer.host, lanes=peer.lanes, max_norm_ratio=max_norm_ratio)
        self.matchmaker = Matchmaker(peer.host, peer.dht, peer.config.swarm, target_size=target_group_size,
                                     min_size=min_group_size, budget=matchmaking_budget,
                                     upload_mbps=peer.config.upload_mbps, send_concurrency=send_concurrency)
        self.allreduce.register_handlers()
        self.matchmaker.register_handlers()
        # bytes/s: sizes the stall timeouts; a declared upload rate, else 100 Mbit/s, then measured
        self.bandwidth = (peer.config.upload_mbps or 100) * 125_000
        self._residuals: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    async def all_reduce(self, tensors: list[torch.Tensor], *, weight: float = 1.0, codec: str = "none",
                         timeout: float = 120.0, group_key: str = "default",
                         matchmaking_timeout: float | None = None) -> AveragingResult:
        """The weighted mean of ``tensors`` over the group's contributors, or ``RoundFailed`` /
        ``MatchmakingFailed`` (then nothing was changed and the caller may retry). Finding the
        group may take ``matchmaking_timeout`` seconds (default: all of ``timeout``)."""
        deadline = trio.current_time() + timeout
        flat = await trio.to_thread.run_sync(
            lambda: torch.cat([t.detach().reshape(-1).to(torch.float32).cpu() for t in tensors]).numpy())
        spec = await self.matchmaker.find_group(
            group_key, len(flat), codec, min(deadline, trio.current_time() + (matchmaking_timeout or timeout)))
        me = spec.members.index(self.matchmaker.me)
        log.info("round %s starts: %d members, %d values, codec %s, contributions to %s at once", spec.group_id,
                 len(spec.members), len(flat), codec, spec.send_concurrency or "all owners")
        send_residual = result_residual = None
        if get_codec(codec).lossy:
            layout = (tuple(tuple(t.shape) for t in tensors), codec)
            if layout not in self._residuals:
                self._residuals[layout] = (np.zeros(len(flat), np.float32), np.zeros(len(flat), np.float32))
            send_residual, result_residual = self._residuals[layout]
        averaged, stats = await self.allreduce.run(
            spec, me, flat, weight, deadline=deadline, send_residual=send_residual,
            result_residual=result_residual, bandwidth=self.bandwidth)
        seconds = stats.phase_seconds.get("exchange", 0)
        if seconds > 0 and stats.bytes_sent > 1e6:
            self.bandwidth = max(1e5, stats.bytes_sent / seconds)
        return AveragingResult(self._unflatten(averaged, tensors), stats)

    async def linger(self) -> None:
        """Call before leaving the swarm: returns once the members of this peer's recent rounds
        no longer need it for repair (``AllReduce.linger``)."""
        await self.allreduce.linger()

    @staticmethod
    def _unflatten(flat: np.ndarray, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views into ``flat`` (a fresh buffer each round, written by nobody afterwards)."""
        out, offset = [], 0
        for t in like:
            n = t.numel()
            out.append(torch.from_numpy(flat[offset:offset + n]).reshape(t.shape).to(t.dtype).to(t.device))
            offset += n
        return out
