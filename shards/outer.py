"""DiLoCo's outer Nesterov step with its momentum sharded: each peer holds the momentum of the
shards it owns only, steps those, and takes every other shard's new weights from its owners.

A round: every peer of the group holds the same mean pseudo-gradient (the all-reduce's consistent
outcome). An owner of shard s steps it (its momentum, the mean's slice of s) and keeps the new
slice of the weights; every other peer asks an owner of s for it over ``/legion/shards/1.0.0``.
A request names the round and a fingerprint of the mean's slice, so only a peer that stepped the
same mean answers. Replicas hold the same momentum and so give bit-identical slices.

A peer that becomes an owner (a new assignment, a replaced owner) first asks the other owners,
then any peer, for the shard's momentum at that round; with nobody left holding it the momentum
restarts from zero and ``momentum_lost`` counts it. An owner keeps its last two rounds of momentum
so it can hand a shard over after it stops owning it. A peer whose view of the owners is stale still
finds the slices: it asks every peer once the owners it knows fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from averaging.wire import FrameError, read_frame, write_frame, write_frame_within
from optim.diloco import nesterov_step
from shards.assignment import Assignment
from shards.layout import ShardLayout

log = logging.getLogger(__name__)

PROTOCOL = "/legion/shards/1.0.0"
KEEP_ROUNDS = 2


@dataclass
class ShardStats:
    bytes_fetched: int = 0
    momentum_handovers: int = 0  # momentum received from another peer
    momentum_lost: int = 0  # shards whose momentum nobody held: restarted from zero


def _to_bytes(values: torch.Tensor) -> bytes:
    return values.contiguous().numpy().tobytes()


def _fingerprint(values: torch.Tensor) -> bytes:
    return hashlib.sha256(_to_bytes(values)).digest()[:16]


class ShardedOuter:
    """``assignment()`` is this peer's current view of the owners; ``peers()`` the peers it may ask
    when the owners it knows do not answer. ``register()`` installs the stream handler."""

    def __init__(self, host: IHost, layout: ShardLayout, *, lr: float, momentum: float, run_id: str,
                 assignment: Callable[[], Assignment], peers: Callable[[], list[str]], timeout: float = 10.0) -> None:
        self.host, self.layout, self.lr, self.momentum, self.run_id = host, layout, lr, momentum, run_id
        self.assignment, self.peers, self.timeout = assignment, peers, timeout
        self.me = host.get_id().to_base58()
        self.history: dict[int, dict[int, torch.Tensor]] = {}  # shard -> {round: momentum before its step}
        self.outputs: dict[tuple[int, int], tuple[bytes, torch.Tensor]] = {}  # (round, shard) -> (fingerprint, weights)
        self._stepped: dict[int, trio.Event] = {}
        self.stats = ShardStats()

    def register(self) -> None:
        self.host.set_stream_handler(PROTOCOL, self._handle)

    @property
    def state_bytes(self) -> int:
        """Bytes of momentum of the shards this peer stepped in its newest round (what it owns;
        momentum kept for a handover after it stopped owning a shard ages out in two rounds)."""
        newest = max((max(rounds) for rounds in self.history.values() if rounds), default=None)
        return sum(rounds[newest].numel() * 4 for rounds in self.history.values() if newest in rounds)

    # ----- one round
    async def step(self, round_: int, weights: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor | None:
        """The swarm weights after round ``round_``'s outer step (``weights`` and ``gradient`` are
        the same on every peer of the group), or None if some shard could not be had."""
        assignment = self.assignment()
        mine = set(assignment.shards_of(self.me))
        slices: dict[int, torch.Tensor] = {}
        event = self._stepped.setdefault(round_, trio.Event())
        try:
            async with trio.open_nursery() as nursery:
                for shard in sorted(mine):
                    nursery.start_soon(self._own, round_, shard, weights, gradient, assignment, slices)
            event.set()  # owned shards are out: answer the others
            async with trio.open_nursery() as nursery:
                for shard in range(self.layout.count):
                    if shard not in mine:
                        nursery.start_soon(self._fetch, round_, shard, weights, gradient, assignment, slices)
        finally:
            event.set()
            self._forget_before(round_ - KEEP_ROUNDS + 1)
        if len(slices) < self.layout.count:
            log.warning("round %d: %d of %d shards could not be had", round_, self.layout.count - len(slices),
                        self.layout.count)
            return None
        return torch.cat([slices[s] for s in range(self.layout.count)])

    def _slice(self, shard: int, values: torch.Tensor) -> torch.Tensor:
        start, end = self.layout.bounds(shard)
        return values[start:end]

    def _apply(self, round_: int, shard: int, weights: torch.Tensor, gradient: torch.Tensor,
               momentum: torch.Tensor) -> torch.Tensor:
        """The outer Nesterov step on one shard, the unsharded optimizer's formula on its slice."""
        g = self._slice(shard, gradient)
        new, buffer = nesterov_step(self._slice(shard, weights), g, momentum, self.lr, self.momentum)
        self.history.setdefault(shard, {})[round_ + 1] = buffer
        self.outputs[(round_, shard)] = (_fingerprint(g), new)
        return new

    async def _own(self, round_: int, shard: int, weights: torch.Tensor, gradient: torch.Tensor,
                   assignment: Assignment, slices: dict[int, torch.Tensor]) -> None:
        momentum = self.history.get(shard, {}).get(round_)
        if momentum is None:
            momentum = await self._acquire(round_, shard, assignment)
        slices[shard] = self._apply(round_, shard, weights, gradient, momentum)

    async def _acquire(self, round_: int, shard: int, assignment: Assignment) -> torch.Tensor:
        """The momentum of ``shard`` before round ``round_``'s step, from whoever holds it."""
        size = self.layout.size(shard)
        if round_ == 0:
            return torch.zeros(size)
        for peer in self._candidates(shard, assignment):
            reply = await self._request(peer, {"t": "state", "run": self.run_id, "round": round_, "shard": shard}, size)
            if reply is not None:
                self.stats.momentum_handovers += 1
                log.info("took over shard %d at round %d with momentum from %s", shard, round_, peer)
                return reply
        self.stats.momentum_lost += 1
        log.warning("nobody holds shard %d's momentum at round %d: it restarts from zero", shard, round_)
        return torch.zeros(size)

    async def _fetch(self, round_: int, shard: int, weights: torch.Tensor, gradient: torch.Tensor,
                     assignment: Assignment, slices: dict[int, torch.Tensor]) -> None:
        fingerprint = _fingerprint(self._slice(shard, gradient))
        request = {"t": "update", "run": self.run_id, "round": round_, "shard": shard, "fp": fingerprint}
        for peer in self._candidates(shard, assignment):
            reply = await self._request(peer, request, self.layout.size(shard))
            if reply is not None:
                slices[shard] = reply
                self.stats.bytes_fetched += reply.numel() * 4
                return
        momentum = self.history.get(shard, {}).get(round_)
        if momentum is not None:  # a former owner: it can still step the shard itself
            slices[shard] = self._apply(round_, shard, weights, gradient, momentum)

    def _candidates(self, shard: int, assignment: Assignment) -> list[str]:
        owners = [p for p in assignment.owners[shard] if p != self.me]
        return owners + sorted(p for p in self.peers() if p != self.me and p not in owners)

    async def _request(self, peer: str, request: dict, size: int) -> torch.Tensor | None:
        try:
            with trio.fail_after(self.timeout):
                stream = await self.host.new_stream(ID.from_base58(peer), [PROTOCOL])
                try:
                    await write_frame(stream, request)
                    reply, payload = await read_frame(stream, size * 4)
                finally:
                    with trio.move_on_after(1), contextlib.suppress(Exception):
                        await stream.close()
        except Exception as exc:  # dial failures, resets, deadlines: libp2p raises many kinds
            log.debug("shard request to %s failed: %s", peer, exc)
            return None
        if reply.get("t") != "ok" or len(payload) != size * 4:
            return None
        values = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).copy())
        return values if torch.isfinite(values).all() else None

    def _forget_before(self, round_: int) -> None:
        for key in [k for k in self.outputs if k[0] < round_]:
            del self.outputs[key]
        for rounds in self.history.values():
            for r in [r for r in rounds if r < round_]:
                del rounds[r]
        for r in [r for r in self._stepped if r < round_]:
            del self._stepped[r]

    # ----- serving
    async def _handle(self, stream: INetStream) -> None:
        try:
            with trio.fail_after(self.timeout + 2):
                request, _ = await read_frame(stream, 0)
                payload = await self._answer(request)
            await write_frame_within(stream, self.timeout, {"t": "ok" if payload is not None else "none"},
                                     payload or b"", what="a shard reply")
        except (FrameError, trio.TooSlowError) as exc:
            log.debug("shard request ended: %s", exc)
        except Exception:  # an escaping exception would tear down the host
            log.exception("shard request failed")
        finally:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.close()

    async def _answer(self, request: dict) -> bytes | None:
        round_, shard = request.get("round"), request.get("shard")
        if request.get("run") != self.run_id or not isinstance(round_, int) or not isinstance(shard, int) \
                or not 0 <= shard < self.layout.count:
            return None
        if request.get("t") == "state":
            momentum = self.history.get(shard, {}).get(round_)
            return None if momentum is None else _to_bytes(momentum)
        if request.get("t") == "update":
            if (round_, shard) not in self.outputs and shard in self.assignment().shards_of(self.me):
                # an owner that has not stepped that round yet: wait for it a while
                with trio.move_on_after(0.8 * self.timeout):
                    await self._stepped.setdefault(round_, trio.Event()).wait()
            output = self.outputs.get((round_, shard))
            if output is not None and output[0] == request.get("fp"):
                return _to_bytes(output[1])
        return None
