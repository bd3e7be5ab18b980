"""DiLoCo's outer Nesterov step with its momentum sharded: each shard is reduced at one of its
owners, which steps it, and only its owners hold its momentum.

A round (``plan`` for the averaging, then ``step``): the group's leader gives each member a part
made of whole shards, each shard to an owner in the group where there is one (``order``). A
member reduces the contributions to its part like any all-reduce part, then sends back not the
mean pseudo-gradient g but the Nesterov direction p = g + mu (mu m + g) of its shards (``prepare``
holds their momentum m, taken from another holder if it lacks it). Every member then holds the
same p for the whole vector and takes the same new weights w - lr p; every owner of a shard sets
its momentum to (p + mu m) / (1 + mu), a function of what every owner holds alike, so replicas stay
bit-identical whichever owner reduced. Without the sharding that is mu m + g up to rounding.
Traffic is an ordinary all-reduce: no weights or momentum move except at a handover.

Momentum belongs to the weights it steps: each copy is keyed by its round and the digest of the
swarm weights before that round's step (its *lineage*). A round no group averaged carries the copy
over under the same weights; a peer whose weights parted from the swarm's (a failed round while the
others averaged) keeps copies no one else asks for, and once it adopts the swarm's state it asks for
the swarm's copies, never mixing a direction of weights the swarm abandoned into its steps.

A peer that becomes an owner asks the other owners, then any peer, for the shard's momentum at its
round and weights, over ``/legion/shards/3.0.0``. Asked when the shard is needed (to reduce it) and
nobody holds that lineage's copy, the momentum restarts from zero and ``momentum_lost`` counts it
(unless the holders answer that they are past that round: then the asking peer is behind the swarm
and will fetch its state). Asked ahead of need (an owner after its step), a miss stores and counts
nothing: the holders may not have stepped yet. A peer keeps momentum of the last two rounds, and
goes on advancing a shard's for two rounds after it stopped owning it, so a former owner can hand
the shard over at the round the new owner asks for.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from averaging.allreduce import MAX_ABS_VALUE, GroupSpec, ResultTransform
from averaging.wire import FrameError, read_frame, write_frame, write_frame_within
from shards.assignment import Assignment
from shards.layout import ShardLayout

log = logging.getLogger(__name__)

PROTOCOL = "/legion/shards/3.0.0"  # 2: momentum requests only (updates travel in the all-reduce); 3: by lineage
KEEP_ROUNDS = 2
CHECK_ASKS = 3  # peers asked for a second copy of a shard's momentum after the first answer


@dataclass
class ShardStats:
    momentum_handovers: int = 0  # momentum received from another peer
    momentum_lost: int = 0  # shards whose momentum nobody held: restarted from zero


def _to_bytes(values: torch.Tensor) -> bytes:
    return values.contiguous().numpy().tobytes()


Lineage = tuple[int, str]  # (round, digest of the swarm weights before that round's step)


class ShardedOuter:
    """``assignment()`` is this peer's current view of the owners; ``peers()`` the peers it may ask
    when the owners it knows do not answer; ``digest(weights)`` the digest that keys momentum to the
    weights it belongs to (the one the averaging groups agree on). ``register()`` installs the stream
    handler."""

    def __init__(self, host: IHost, layout: ShardLayout, *, lr: float, momentum: float, run_id: str,
                 assignment: Callable[[], Assignment], peers: Callable[[], list[str]],
                 digest: Callable[[torch.Tensor], str], timeout: float = 10.0) -> None:
        self.host, self.layout, self.lr, self.momentum, self.run_id = host, layout, lr, momentum, run_id
        self.assignment, self.peers, self.digest, self.timeout = assignment, peers, digest, timeout
        self.me = host.get_id().to_base58()
        self.history: dict[int, dict[Lineage, torch.Tensor]] = {}  # shard -> {lineage: momentum before its step}
        self._reduced: dict[int, set[int]] = {}  # round -> shards this peer reduced
        self._held_until: dict[int, int] = {}  # shard -> the last round this peer owned or reduced it
        self._stepped: dict[int, trio.Event] = {}  # round -> set once its momentum updates are made
        self._shard_at = {layout.bounds(shard): shard for shard in range(layout.count)}
        self.stats = ShardStats()

    def register(self) -> None:
        self.host.set_stream_handler(PROTOCOL, self._handle)

    @property
    def state_bytes(self) -> int:
        """Bytes of momentum of the shards this peer holds at its newest round (what it owns and
        what it reduced; momentum kept for a handover after that ages out in two rounds)."""
        newest = max((round_ for copies in self.history.values() for round_, _ in copies), default=None)
        return sum(m.numel() * 4 for copies in self.history.values() for (r, _), m in copies.items() if r == newest)

    def plan(self, round_: int, base: str) -> "ShardedRoundPlan":
        """How round ``round_`` of the weights of digest ``base`` is averaged
        (``averaging.averager.RoundPlan``)."""
        return ShardedRoundPlan(self, round_, base)

    # ----- averaging a round
    def order(self, members: list[str]) -> tuple[list[tuple[int, int]], list[int]]:
        """Each shard to the least loaded of its owners in the group (any member if none is),
        members' shards one after another: the order and part bounds of the group's vector."""
        owners = self.assignment().owners
        load, parts = dict.fromkeys(members, 0), {m: [] for m in members}
        for shard in range(self.layout.count):
            pool = [o for o in owners[shard] if o in load] or members
            chosen = min(pool, key=lambda m: (load[m], members.index(m)))
            parts[chosen].append(shard)
            load[chosen] += self.layout.size(shard)
        order, bounds = [], [0]
        for member in members:
            order += [self.layout.bounds(shard) for shard in parts[member]]
            bounds.append(bounds[-1] + load[member])
        return order, bounds

    async def prepare(self, round_: int, base: str, order: list[tuple[int, int]], start: int,
                      end: int) -> ResultTransform:
        """The transform of the part ``start:end`` of a group's vector in ``order``: the Nesterov
        direction of its shards from their momentum before round ``round_`` of weights ``base``."""
        shards, position = [], 0
        for a, b in order:
            following = position + b - a
            if position < end and following > start:  # within our part, or across its edge
                if position < start or following > end or (a, b) not in self._shard_at:
                    raise ValueError(f"range {a}:{b} of our part is not a whole shard")
                shards.append(self._shard_at[(a, b)])
            position = following
        momenta: dict[int, torch.Tensor] = {}

        async def take(shard: int) -> None:
            momenta[shard] = await self._momentum((round_, base), shard)

        async with trio.open_nursery() as nursery:
            for shard in shards:
                nursery.start_soon(take, shard)
        self._reduced[round_] = set(shards)
        held = torch.cat([momenta[s] for s in shards]).numpy() if shards else np.zeros(0, np.float32)
        mu = np.float32(self.momentum)

        def direction(a: int, b: int, mean: np.ndarray) -> np.ndarray:
            buffer = held[a - start:b - start] * mu + mean  # ``nesterov_step``'s order of operations
            return mean + mu * buffer

        return direction

    async def _momentum(self, lineage: Lineage, shard: int) -> torch.Tensor:
        """``shard``'s momentum of ``lineage``, needed now: held, else from whoever holds it, else
        zero (counted lost)."""
        held = self.history.get(shard, {}).get(lineage)
        if held is None:
            held = await self._acquire(lineage, shard, self.assignment())
            if held is None:
                held = torch.zeros(self.layout.size(shard))
            self.history.setdefault(shard, {})[lineage] = held
        return held

    async def step(self, round_: int, base: str, weights: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """The swarm weights after round ``round_`` of weights ``base`` averaged to ``direction``
        (the same on every member); the momentum of the shards this peer owns or reduced moves to
        round ``round_ + 1`` of the new weights, and shards it owns without their momentum take it
        from a holder."""
        new = weights - self.lr * direction
        after = await trio.to_thread.run_sync(self.digest, new)
        self._advance((round_, base), after,
                      lambda shard, m: (self._slice(shard, direction) + self.momentum * m) / (1 + self.momentum))
        await self._take_missing((round_ + 1, after))
        return new

    async def skip(self, round_: int, base: str) -> None:
        """Round ``round_`` of weights ``base`` averaged nowhere (its outcome is the same on every
        member): the weights stay, and the momentum carries over unchanged."""
        self._advance((round_, base), base, lambda shard, m: m)
        await self._take_missing((round_ + 1, base))

    def _advance(self, lineage: Lineage, after: str, update: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """Move the momentum of ``lineage`` of the shards this peer owns or reduced to the next
        round under weights ``after``, and of those it owned or reduced in the last ``KEEP_ROUNDS``
        rounds: a new owner asks for the current round, and a former owner that stopped at the round
        it lost the shard answered "none" (a chaos run lost momentum so, every other replica being
        the new owner itself). Every member applies the same update, so a former owner's copy stays
        bit-identical. Copies of other weights at that round belong to no step and age out."""
        round_ = lineage[0]
        current = set(self.assignment().shards_of(self.me)) | self._reduced.pop(round_, set())
        for shard in current:
            self._held_until[shard] = round_
        kept = current | {s for s, until in self._held_until.items() if until >= round_ - KEEP_ROUNDS}
        self._held_until = {s: until for s, until in self._held_until.items() if s in kept}
        for shard in kept:
            momentum = self.history.get(shard, {}).get(lineage)
            if momentum is not None:
                self.history[shard][(round_ + 1, after)] = update(shard, momentum)
        self._stepped.setdefault(round_, trio.Event()).set()  # holders of round + 1 may answer now
        self._forget_before(round_ - KEEP_ROUNDS + 1)

    async def _take_missing(self, lineage: Lineage) -> None:
        """Take the momentum of ``lineage`` of the shards this peer owns and lacks, ahead of need:
        what nobody holds yet (its holders may not have stepped) is left to ``_momentum``."""
        async def take(shard: int) -> None:
            momentum = await self._acquire(lineage, shard, self.assignment(), needed=False)
            if momentum is not None:  # unless the round began meanwhile and took its own
                self.history.setdefault(shard, {}).setdefault(lineage, momentum)

        async with trio.open_nursery() as nursery:
            for shard in self.assignment().shards_of(self.me):
                if lineage not in self.history.get(shard, {}):
                    nursery.start_soon(take, shard)

    def _slice(self, shard: int, values: torch.Tensor) -> torch.Tensor:
        start, end = self.layout.bounds(shard)
        return values[start:end]

    async def _acquire(self, lineage: Lineage, shard: int, assignment: Assignment, *,
                       needed: bool = True) -> torch.Tensor | None:
        """The momentum of ``shard`` of ``lineage`` from whoever holds it; None if nobody does
        (counted lost if ``needed``, unless this peer is behind the swarm)."""
        round_, base = lineage
        size = self.layout.size(shard)
        if round_ == 0:
            return torch.zeros(size)
        owners = assignment.owners[shard]
        answers: dict[str, torch.Tensor] = {}
        misses: dict[str, str] = {}  # peer -> why it gave nothing
        request = {"t": "state", "run": self.run_id, "round": round_, "base": base, "shard": shard}
        asked_since_an_answer = 0
        for peer in self._candidates(shard, assignment):
            reply = await self._request(peer, request, size)
            if isinstance(reply, str):
                misses[peer] = reply
            else:
                answers[peer] = reply
            # a copy, an owner's or a former owner's, is checked against a second holder's where one
            # of the next few peers asked has it: copies of one lineage are bit-identical, so one that
            # differs was forged (or restarted from zero)
            asked_since_an_answer += bool(answers)
            if len(answers) == 2 or asked_since_an_answer > CHECK_ASKS:
                break
        if answers:
            peer, chosen = min(answers.items(), key=lambda item: float(item[1].norm()))
            if len(answers) == 2 and not torch.equal(*answers.values()):
                log.warning("holders %s of shard %d's momentum at round %d disagree; took the smaller, from %s",
                            ", ".join(answers), shard, round_, peer)
            self.stats.momentum_handovers += 1
            log.info("took over shard %d at round %d with momentum from %s", shard, round_, peer)
            return chosen
        why = ", ".join(f"{peer[-6:]} {reason}" for peer, reason in misses.items()) or "nobody to ask"
        if not needed:
            log.debug("shard %d's momentum at round %d of weights %s is held by no one yet (%s)",
                      shard, round_, base[:8], why)
        elif any(reason.startswith("past it") for reason in misses.values()):
            # holders have moved on by more rounds than they keep: this peer is behind the swarm (say
            # it restarted from an old checkpoint) and will fetch its state; the momentum lives on
            log.info("shard %d's momentum at round %d is gone from its holders, who are past that round "
                     "(%s): this peer is behind the swarm", shard, round_, why)
        else:
            self.stats.momentum_lost += 1
            log.warning("nobody holds shard %d's momentum at round %d of weights %s: it restarts from zero "
                        "(owners %s; %s)", shard, round_, base[:8], ", ".join(p[-6:] for p in owners) or "none", why)
        return None

    def _candidates(self, shard: int, assignment: Assignment) -> list[str]:
        owners = [p for p in assignment.owners[shard] if p != self.me]
        return owners + sorted(p for p in self.peers() if p != self.me and p not in owners)

    async def _request(self, peer: str, request: dict, size: int) -> torch.Tensor | str:
        """The momentum ``peer`` sends, or why there is none ("none held", "past it: at round N",
        "of other weights", "failed: ...", "dropped")."""
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
            return f"failed: {type(exc).__name__}"
        newest = reply.get("newest")
        if reply.get("t") == "none" and type(newest) is int and newest > request["round"]:
            return f"past it: at round {newest}"
        if reply.get("t") == "none" and reply.get("other") is True:
            return "of other weights"
        if reply.get("t") != "ok" or len(payload) != size * 4:
            return "none held"
        values = torch.from_numpy(np.frombuffer(payload, dtype=np.float32).copy())
        if not torch.isfinite(values).all() or (size and float(values.abs().max()) > MAX_ABS_VALUE):
            log.warning("dropped momentum from %s: not finite, or beyond %g", peer, MAX_ABS_VALUE)
            return "dropped"
        return values

    def _forget_before(self, round_: int) -> None:
        for copies in self.history.values():
            for lineage in [lineage for lineage in copies if lineage[0] < round_]:
                del copies[lineage]
        for table in (self._stepped, self._reduced):
            for r in [r for r in table if r < round_ - 1]:
                del table[r]

    # ----- serving
    async def _handle(self, stream: INetStream) -> None:
        try:
            with trio.fail_after(self.timeout + 2):
                request, _ = await read_frame(stream, 0)
                payload = await self._answer(request)
            header = {"t": "ok"}
            if payload is None:  # with the newest round held, if any: the asker may be behind
                header = {"t": "none", **self._what_is_held(request)}
            await write_frame_within(stream, self.timeout, header, payload or b"", what="a shard reply")
        except (FrameError, trio.TooSlowError) as exc:
            log.debug("shard request ended: %s", exc)
        except Exception:  # an escaping exception would tear down the host
            log.exception("shard request failed")
        finally:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.close()

    async def _answer(self, request: dict) -> bytes | None:
        round_, base, shard = request.get("round"), request.get("base"), request.get("shard")
        if request.get("t") != "state" or request.get("run") != self.run_id or not isinstance(round_, int) \
                or not isinstance(base, str) or not isinstance(shard, int) or not 0 <= shard < self.layout.count:
            return None
        copies = self.history.get(shard, {})
        rounds = {r for r, _ in copies}
        if round_ not in rounds and round_ - 1 in rounds:  # about to step it: wait for that a while
            with trio.move_on_after(0.8 * self.timeout):
                await self._stepped.setdefault(round_ - 1, trio.Event()).wait()
        momentum = copies.get((round_, base))
        return None if momentum is None else _to_bytes(momentum)

    def _what_is_held(self, request: dict) -> dict:
        """For a "none" reply: the newest round held of the shard asked for, and whether the round
        asked for is held under other weights."""
        shard = request.get("shard")
        rounds = [r for r, _ in self.history.get(shard, {})] if type(shard) is int else []
        return {"newest": max(rounds), "other": request.get("round") in rounds} if rounds else {}


class ShardedRoundPlan:
    """``ShardedOuter``'s plan for one round's averaging (``averaging.averager.RoundPlan``)."""

    def __init__(self, outer: ShardedOuter, round_: int, base: str) -> None:
        self.outer, self.round, self.base = outer, round_, base

    def order(self, members: list[str]) -> tuple[list[tuple[int, int]], list[int]]:
        return self.outer.order(members)

    @property
    def ranges(self) -> int:
        return self.outer.layout.count

    async def prepare(self, spec: GroupSpec, me: int) -> ResultTransform:
        return await self.outer.prepare(self.round, self.base, list(spec.order), *spec.part(me))
