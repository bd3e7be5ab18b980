"""``Averager``: the library entry point for averaging torch tensors with peers of a swarm."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import trio

from averaging.allreduce import MAX_MEMBERS, AllReduce, CrossReduce, GroupSpec, ResultTransform, RoundFailed, RoundStats
from averaging.codecs import get_codec
from averaging.matchmaking import CELLS_PROTOCOL, Matchmaker, MatchmakingFailed

log = logging.getLogger(__name__)

CELL_BUDGET_SHARE = 0.25  # of a round's timeout: the longest a two-level round's cells wait for a group missing


@dataclass
class AveragingResult:
    tensors: list[torch.Tensor]
    stats: RoundStats


class RoundPlan(Protocol):
    """Owner-side steps: a caller whose state for each range of the vector lives at some peers
    only (``shards``) has each range reduced at one of them, which sends back not the mean but
    its transform (the optimizer step only it can take)."""

    def order(self, members: list[str]) -> tuple[list[tuple[int, int]], list[int]]:
        """At the group's leader: the vector as ranges of the natural one, and the part bounds
        (members + 1 of them, in that order) giving each member the ranges it reduces."""

    async def prepare(self, spec: GroupSpec, me: int) -> ResultTransform:
        """At every member once the group is known: the transform of the part it reduces
        (``spec.order``'s ranges within its bounds); ``ValueError`` if it cannot take it."""

    @property
    def ranges(self) -> int:
        """How many ranges ``order`` cuts the vector into, whatever the members: in a two-level
        round each is a cell, reduced across the round's groups before its transform (every
        group's reducer of a range must then take the same transform: a sharded run's owners
        hold the same momentum)."""


class Averager:
    """Weighted averaging of a list of tensors with a group found through the DHT.

    ``peer`` is a running ``swarm.peer.Peer``. Error-feedback residuals are kept per tensor layout
    and codec, so a lossy codec's error is carried into the next round rather than lost.
    ``send_concurrency`` (set in the groups this peer leads): how many owners a member sends its
    contributions to at once, 0 for all (see ``AllReduce.run``); 1 where CPU is short.
    ``max_weight``: the most a contribution may weigh (what a peer can compute in a round: samples
    per step times steps); larger declared weights are clipped, so no member can become the average.
    """

    def __init__(self, peer, *, target_group_size: int = 8, min_group_size: int = 2,
                 matchmaking_budget: float = 5.0, max_norm_ratio: float = 100.0, send_concurrency: int = 0,
                 max_weight: float = 1e12) -> None:
        self.allreduce = AllReduce(peer.host, lanes=peer.lanes, max_norm_ratio=max_norm_ratio, max_weight=max_weight)
        self.matchmaker = Matchmaker(peer.host, peer.dht, peer.config.swarm, target_size=target_group_size,
                                     min_size=min_group_size, budget=matchmaking_budget,
                                     upload_mbps=peer.config.upload_mbps, send_concurrency=send_concurrency)
        # the owners of a two-level round's cells find each other with one of their own, seeking
        # every cell they own at once (``_cross_groups``)
        self.cells_matchmaker = Matchmaker(peer.host, peer.dht, peer.config.swarm, budget=matchmaking_budget,
                                           upload_mbps=peer.config.upload_mbps, protocol=CELLS_PROTOCOL,
                                           one_at_a_time=False)
        self.cells_matchmaker.reachability = lambda: self.matchmaker.reachability()
        self.cells_matchmaker.relayed = lambda: self.matchmaker.relayed()
        self.allreduce.register_handlers()
        self.matchmaker.register_handlers()
        self.cells_matchmaker.register_handlers()
        # bytes/s: sizes the stall timeouts; a declared upload rate, else 100 Mbit/s, then measured
        self.bandwidth = (peer.config.upload_mbps or 100) * 125_000
        self._residuals: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    async def all_reduce(self, tensors: list[torch.Tensor], *, weight: float = 1.0, codec: str = "none",
                         timeout: float = 120.0, group_key: str = "default",
                         matchmaking_timeout: float | None = None, plan: RoundPlan | None = None,
                         base: str = "", across_groups: bool = False, rotation: str | None = None) -> AveragingResult:
        """The weighted mean of ``tensors`` over the group's contributors, or ``RoundFailed`` /
        ``MatchmakingFailed`` (then nothing was changed and the caller may retry). Finding the
        group may take ``matchmaking_timeout`` seconds (default: all of ``timeout``); the round
        itself then has ``timeout`` seconds from the moment its group formed. (Counted from the
        start, a group that formed late, as under churn when expected peers do not show, had a
        second or two left, and every round of the swarm failed; ``bench/chaos.py``.)

        Only peers that give the same ``base`` (``Matchmaker.find_group``) average together.

        With ``plan`` every part's result is its reducer's transform of the mean (``RoundPlan``);
        every member of the group must average with a plan. Results then carry no error feedback:
        the transform's reducer changes from round to round.

        ``across_groups``, where more peers average under ``group_key`` than a group holds
        (``matchmaker.swarm_size`` above its ``target_size``): a two-level round. The vector is
        cut into cells (``target_size`` of them; with ``plan``, its ranges), each member of a
        group reduces whole cells, and each cell's owners in the round's groups then reduce it
        with each other (``_cross_groups``), so that every group gets the same mean, not one of
        its own (and with ``plan``, the same transform of it). Results then carry no error
        feedback (each group's owners must encode that mean alike).

        ``rotation``: the round's series and place in its cycle (``groups.rotation_of``), under
        which both levels' keys are drawn and placed (``Matchmaker.find_group``)."""
        flat = await trio.to_thread.run_sync(_flatten, tensors)
        cells = 0
        if across_groups and self.matchmaker.several_groups:
            cells = self.matchmaker.target_size if plan is None else plan.ranges
        spec = await self.matchmaker.find_group(
            group_key, len(flat), codec, trio.current_time() + (matchmaking_timeout or timeout),
            order=plan.order if plan is not None else None, base=base, cells=cells, rotation=rotation)
        deadline = trio.current_time() + timeout
        me = spec.members.index(self.matchmaker.me)
        log.info("round %s starts: %d members, %d values, codec %s, contributions to %s at once%s", spec.group_id,
                 len(spec.members), len(flat), codec, spec.send_concurrency or "all owners",
                 f", {spec.cells} cells reduced across groups" if spec.cells else "")
        if spec.total != len(flat):  # a leader's spec that does not fit: drop the round, not the peer
            raise _failed(spec, f"the group averages {spec.total} values, this member {len(flat)}")
        transform = None
        if plan is not None or spec.order:
            if plan is None or not spec.order:
                raise _failed(spec, "the group's leader and this member disagree on owner-side steps")
            with trio.move_on_at(deadline):
                try:
                    transform = await plan.prepare(spec, me)
                except ValueError as exc:  # a part this member cannot reduce (a leader's bad order)
                    raise _failed(spec, f"cannot reduce this member's part: {exc}") from exc
            if transform is None:
                raise _failed(spec, "no time left to prepare this member's part")
        permutation = spec.permutation()
        if permutation is not None:
            flat = await trio.to_thread.run_sync(flat.__getitem__, permutation)
        send_residual = result_residual = None
        if get_codec(codec).lossy:
            layout = (tuple(tuple(t.shape) for t in tensors), codec)
            if layout not in self._residuals:
                self._residuals[layout] = (np.zeros(len(flat), np.float32), np.zeros(len(flat), np.float32))
            send_residual, result_residual = self._residuals[layout]
            if plan is not None:  # (a two-level round's owners drop it too: ``AllReduce.run``)
                result_residual = None
        natural_residual = send_residual
        if permutation is not None and send_residual is not None:
            send_residual = send_residual[permutation]
        crossed = RoundStats("cells", [])  # what this member's cells moved at the second level
        try:
            averaged, stats = await self.allreduce.run(
                spec, me, flat, weight, deadline=deadline, send_residual=send_residual,
                result_residual=result_residual, bandwidth=self.bandwidth, transform=transform,
                cross=self._cross_groups(group_key, codec, base, spec.cells, timeout, deadline, crossed, rotation)
                if spec.cells else None)
        except RoundFailed as exc:
            self.matchmaker.exclude(exc.stats.blamed)
            raise
        finally:
            if send_residual is not natural_residual:
                natural_residual[permutation] = send_residual
        stats.bytes_sent += crossed.bytes_sent
        stats.bytes_received += crossed.bytes_received
        if permutation is not None:
            averaged = await trio.to_thread.run_sync(_unpermute, averaged, permutation)
        seconds = stats.phase_seconds.get("exchange", 0)
        if seconds > 0 and stats.bytes_sent > 1e6:
            self.bandwidth = max(1e5, stats.bytes_sent / seconds)
        return AveragingResult(self._unflatten(averaged, tensors), stats)

    def _cross_groups(self, group_key: str, codec: str, base: str, cells: int, timeout: float, deadline: float,
                      counted: RoundStats, rotation: str | None = None) -> CrossReduce:
        """The second level of a two-level round: a cell's owner finds the owners of the same cell
        in the round's other groups (under the cell's own key, standing for its group's
        contributors, until those read stand for every peer expected) and all-reduces the cell
        with them, each group's mean weighted by its total weight. A cell whose owner finds no
        other group keeps its group's mean (the group may be the whole round), as a one-level
        round would; one whose reduction fails fails the round, and so does one that formed no group
        while other groups' owners of it were still seeking there: stepped with their own means,
        the groups would hold weights of their own, and the swarm's lineages part until states are
        fetched. (Owners gone or stopped do not count: their groups' rounds fail, and a group that
        steps alone is caught up with.) Its bytes are added to ``counted``.

        Where a peer expected is not in the round (late, behind, restarting), the covers read stay
        short of the swarm and the cells form a budget after the first declaration: a budget of at
        most ``CELL_BUDGET_SHARE`` of the round's ``timeout`` (the same at every peer of a run).
        With the whole matchmaking budget (DiLoCo's 10 s) a 15 s round's cells, which have about
        6 s, never formed then: every group kept its own mean and the swarm's weights parted
        each time one peer missed a round (a fault-free chaos run in groups of 4, rounds 24-29)."""

        async def cross(cell: int, values: np.ndarray, weight: float, contributors: int) -> np.ndarray:
            matchmaker = self.cells_matchmaker
            # every group of the round in one group per cell, once its owners read stand for every
            # peer expected, up to the most a group holds (beyond MAX_MEMBERS groups a round, cells
            # part into several groups, and their weights with them). Until 2026-12-07 the peers
            # expected were capped at MAX_MEMBERS too, as if each owner were one peer: beyond 256
            # peers (16 groups of 16) a cell formed as soon as 16 groups' owners were read, and the
            # round's later groups reduced it apart
            matchmaker.target_size = MAX_MEMBERS
            matchmaker.covers_expected = max(2, self.matchmaker.swarm_size)
            matchmaker.budget = min(self.matchmaker.budget, timeout * CELL_BUDGET_SHARE)
            now = trio.current_time()
            left = deadline - now
            try:
                # up to half the round's time left: the round's last group may form a matchmaking
                # timeout after the first (its members' views differed, say), and its exchange take longer
                # (with the round's rotation, a cell's key is placed at the same nodes each cycle: a
                # group of the same members, at the same place in it, owns the same cell)
                spec = await matchmaker.find_group(f"{group_key}/cells/{cells}.{cell}", len(values), codec,
                                                   now + left / 2, base=base, covers=contributors,
                                                   rotation=rotation and f"{rotation}/cells/{cells}.{cell}")
            except MatchmakingFailed as exc:
                if exc.others_seeking:
                    # other groups' owners of the cell seek still, and will step it with their own mean
                    # as this one would: the swarm's weights would part (two groups of 4 in a chaos run:
                    # 9 rounds apart, 11 states refetched). Failed, this group's weights stay as they were
                    raise MatchmakingFailed(f"cell {cell} formed no group with the other groups' owners "
                                            f"seeking it: {exc}") from exc
                if exc.others_left:
                    # other groups' owners of the cell sought it and left before this one came: they
                    # stepped it (with each other, alone) or their round failed, and either way this
                    # group's mean alone would part the weights (two groups whose rounds did not
                    # overlap in a chaos run: 8 lineage moves). A group of another lineage leaves the
                    # same trace: this group's weights then stay, and it catches up with the swarm's
                    raise MatchmakingFailed(f"cell {cell} formed no group after other groups' owners of it had "
                                            f"left: {exc}") from exc
                log.info("%s: cell %d reduced in this group only: %s", group_key, cell, exc)
                return values
            # a group weighs what its members do together: up to the largest group's worth
            output, stats = await self.allreduce.run(
                spec, spec.members.index(matchmaker.me), values, weight, deadline=deadline - left / 4,
                bandwidth=self.bandwidth, max_weight=self.allreduce.max_weight * self.matchmaker.target_size)
            counted.bytes_sent += stats.bytes_sent
            counted.bytes_received += stats.bytes_received
            log.info("%s: cell %d reduced across %d groups", group_key, cell, len(stats.contributors))
            return output

        return cross

    async def transform_alone(self, tensors: list[torch.Tensor], plan: RoundPlan) -> list[torch.Tensor]:
        """What a round of this peer alone gives under ``plan``: the transform of its own values."""
        me = self.matchmaker.me
        flat = await trio.to_thread.run_sync(_flatten, tensors)
        order, bounds = plan.order([me])
        spec = GroupSpec("alone", (me,), ((),), tuple(bounds), "none", 0, tuple(tuple(r) for r in order))
        spec.validate()
        transform, permutation = await plan.prepare(spec, 0), spec.permutation()
        values = await trio.to_thread.run_sync(
            lambda: _unpermute(transform(0, len(flat), flat[permutation]), permutation))
        return self._unflatten(values, tensors)

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


def _flatten(tensors: list[torch.Tensor]) -> np.ndarray:
    """The tensors as one float32 vector (off the event loop: it copies every value)."""
    return torch.cat([t.detach().reshape(-1).to(torch.float32).cpu() for t in tensors]).numpy()


def _unpermute(values: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    natural = np.empty_like(values)
    natural[permutation] = values
    return natural


def _failed(spec: GroupSpec, reason: str) -> RoundFailed:
    return RoundFailed(reason, RoundStats(spec.group_id, list(spec.members), outcome="failed", reason=reason))
