"""DiLoCo: H local steps of an inner optimizer, then the pseudo-gradient (round-start weights minus
local weights) is averaged with a compressing codec and applied by an outer Nesterov SGD.

With ``overlap`` (the default) the averaging of round r runs while the peer trains round r+1, and
its outer update is applied one round late: the peer never waits for the network unless a round's
averaging takes longer than a whole round of local steps. Meanwhile the peer trains from an eager
estimate: the swarm weights with the outer step applied to its own pseudo-gradient in place of
the group's mean (alone, that is exactly the next swarm weights). The swarm weights themselves
only ever take averaged updates, so they stay identical on every peer of a group."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Iterable, Protocol

import torch
import trio

from optim.base import Reduced, Reducer, StateError, SwarmOptimizer, assign_flat, check_optimizer_tensors, \
    check_state, flatten, load_optimizer_tensors, optimizer_tensors, weights_digest

log = logging.getLogger(__name__)


def nesterov_step(weights: torch.Tensor, gradient: torch.Tensor, buffer: torch.Tensor, lr: float,
                  momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Outer SGD with Nesterov momentum, torch's convention (buf = mu*buf + g; step g + mu*buf):
    the new weights and the new buffer, the arguments unchanged. ``OuterNesterov.step`` gives the
    same values in place (sharded owners, ``shards.outer``, take the same step direction)."""
    buffer = buffer * momentum + gradient
    return weights - lr * (gradient + momentum * buffer), buffer


class OuterNesterov:
    """SGD with Nesterov momentum on a flat vector (``nesterov_step``, in place)."""

    def __init__(self, size: int, lr: float, momentum: float) -> None:
        self.lr, self.momentum = lr, momentum
        self.buffer = torch.zeros(size)

    def step(self, weights: torch.Tensor, gradient: torch.Tensor) -> None:
        self.buffer.mul_(self.momentum).add_(gradient)
        weights.sub_(self.lr * (gradient + self.momentum * self.buffer))

    def preview(self, weights: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """The weights ``step`` would give, without changing any state."""
        return nesterov_step(weights, gradient, self.buffer, self.lr, self.momentum)[0]


# A round after adopting a peer's state waits for the swarm's round end at most this many rounds' steps
ALIGN_LIMIT = 3


class OwnerSteps(Protocol):
    """The outer step taken where the momentum is held, by the shards' owners
    (``shards.outer.ShardedOuter``): round r of the weights of digest ``base`` (``weights_digest``)
    averages following ``plan(r, base)``, whose result is the step's direction, not the mean
    pseudo-gradient. The momentum belongs to those weights."""

    def plan(self, round_: int, base: str) -> Any: ...

    async def step(self, round_: int, base: str, weights: torch.Tensor, direction: torch.Tensor) -> torch.Tensor: ...

    async def skip(self, round_: int, base: str) -> None: ...


class DiLoCo(SwarmOptimizer):
    """``sharded``, if given, replaces the local outer optimizer (``OwnerSteps``): the momentum is
    held and stepped elsewhere, and this peer keeps no outer state."""

    algorithm = "diloco"

    def __init__(self, params: Iterable[torch.Tensor], inner: torch.optim.Optimizer, reducer: Reducer, *,
                 inner_steps: int = 50, outer_lr: float = 1.0, outer_momentum: float = 0.0, codec: str = "int8",
                 overlap: bool = True, nursery: trio.Nursery | None = None,
                 sharded: OwnerSteps | None = None) -> None:
        super().__init__(params, reducer)
        if inner_steps < 1:
            raise ValueError("inner_steps must be at least 1")
        if overlap and nursery is None:
            raise ValueError("overlap needs a trio nursery to average in the background")
        self.inner, self.inner_steps, self.codec = inner, inner_steps, codec
        self.overlap, self.nursery = overlap, nursery
        self.global_weights = flatten(self.params)  # the last swarm-agreed weights
        self.round_start = self.global_weights.clone()
        self.sharded, self.outer_lr = sharded, outer_lr
        self.outer = None if sharded else OuterNesterov(len(self.global_weights), outer_lr, outer_momentum)
        self.phase_steps = 0  # local steps since this round's start
        self.samples = 0
        self._pending: tuple[trio.Event, list] | None = None  # (done, [Reduced | None])
        self._pending_base = ""  # the base the pending round averages under (``_base``)
        # After adopting a peer's state R mid-run the swarm's pending round is not ours: the next
        # round ends when the swarm seeks a group this peer can join (``swarm_round()``: R, R+1 or
        # R+2, -1 while there is none, None when no other peer trains). For R (the swarm is late)
        # it averages under R. For a later round it averages at once under the base the swarm
        # declares there (``swarm_base(round)``) and takes the swarm's state of that round from a
        # peer (``fetch_state(round)``) while the round averages: fetched first (through a relay,
        # seconds), it came after the swarm's group had formed, round after round. Without a base
        # (or when the round ends without a sign) it fetches the state first.
        self._adopt_next = False
        self._join_round: int | None = None
        self.fetch_state: Callable[[int], Awaitable[tuple[int, dict[str, torch.Tensor]] | None]] | None = None
        self.swarm_round: Callable[[], int | None] | None = None
        self.swarm_base: Callable[[int], str] | None = None
        # (round, base, fetched, [state | None]): the swarm's state of the round joined, on its way
        self._joining: tuple[int, str, trio.Event, list] | None = None
        # The run's last round (its number of rounds), if it has one: a peer that reaches it by
        # taking the swarm's state, joining late, has no round left to average (a chaos run's peer,
        # having taken the state of round 20 of 20 as the others finished, averaged a round 20 alone)
        self.last_round: int | None = None
        # Told of every round's outcome once applied (the round, and the average or None): who
        # watches the swarm's consistency compares the weights of a group's members after it.
        self.on_applied: Callable[[int, Reduced | None], None] | None = None
        # Average only with peers holding the same swarm weights (their digest goes with each
        # round's matchmaking): set by swarm trainers, whose peers may part after failures.
        self.agree_on_weights = False
        self.take_snapshot()

    def step(self, samples: int) -> bool:
        self.inner.step()
        self.phase_steps += 1
        self.samples += samples
        if not self._round_over():
            return False
        self._end_round()
        return True

    @property
    def awaiting_swarm(self) -> bool:
        """Whether this round, the first after adopting a peer's state, ends with the swarm's."""
        return self._adopt_next and self._pending is None

    @property
    def joining(self) -> bool:
        """Whether this peer averages a round of the swarm whose state is still on its way
        (``_join_swarm``): its round is the swarm's, its weights not yet."""
        return self._joining is not None

    def _round_over(self) -> bool:
        if self.awaiting_swarm and self.swarm_round is not None and self.phase_steps < ALIGN_LIMIT * self.inner_steps:
            swarm = self.swarm_round()
            if swarm is not None:
                self._join_round = swarm if swarm >= self.round else None
                return self._join_round is not None
        self._join_round = None
        return self.phase_steps >= self.inner_steps

    def _end_round(self) -> None:
        delta = self.round_start - flatten(self.params)
        weight, self.samples, self.phase_steps = self.samples, 0, 0
        if not self.overlap:
            base = self._base()
            self._apply(self._reduce_blocking([delta], weight, self.codec, f"diloco-{self.round}", self._plan(base),
                                              base), base)
        else:
            base = None
            if self.awaiting_swarm and self._join_round != self.round and self.fetch_state is not None:
                base = self._join_swarm(self._join_round)
            self._adopt_next = False
            self._apply_pending()
            if self.last_round is not None and self.round >= self.last_round:
                if self._joining is not None:
                    self._take_joined_state()
            else:
                done, slot = trio.Event(), [None]
                self._pending, self._pending_base = (done, slot), base or self._base()
                trio.from_thread.run_sync(self.nursery.start_soon, self._average_in_background,
                                          delta, weight, f"diloco-{self.round}", self._plan(self._pending_base),
                                          self._pending_base, done, slot)
        # (the eager estimate while a round averages in the background)
        self.round_start = self._estimate(delta) if self._pending is not None else self.global_weights.clone()
        assign_flat(self.params, self.round_start)

    def _estimate(self, delta: torch.Tensor) -> torch.Tensor:
        """The eager estimate: the outer step with this peer's own pseudo-gradient (without the
        momentum term when the momentum is sharded: this peer does not hold it)."""
        if self.outer is None:
            return self.global_weights - self.outer_lr * delta
        return self.outer.preview(self.global_weights, delta)

    def _plan(self, base: str) -> Any:
        """How this round is averaged: as every round, unless the owners step (``OwnerSteps``)."""
        return None if self.sharded is None else self.sharded.plan(self.round, base)

    def _base(self) -> str:
        """What this round's pseudo-gradient is an update to: the swarm weights its mean applies to
        (their digest, where groups agree on weights or the owners key momentum to them)."""
        return weights_digest(self.global_weights) if self.agree_on_weights or self.sharded is not None else ""

    async def _average_in_background(self, delta: torch.Tensor, weight: float, key: str, plan: Any, base: str,
                                     done: trio.Event, slot: list) -> None:
        try:
            slot[0] = await self._reducer_for(plan, base)([delta], weight, self.codec, key)
        finally:
            done.set()

    def _join_swarm(self, round_: int | None) -> str | None:
        """Join the swarm's newer round ``round_`` under the base its seekers declare, the swarm's
        state of that round fetched in the background (``_apply_pending`` takes it): returns that
        base. Without one, fetch the swarm's state first and return None (the round averages under
        the state's base); without a state either (every peer may be waiting, as after a round that
        failed for all) the peer averages its own round."""
        base = self.swarm_base(round_) if round_ is not None and self.swarm_base is not None else ""
        if base:
            fetched, slot = trio.Event(), [None]
            self._joining = (round_, base, fetched, slot)
            trio.from_thread.run_sync(self.nursery.start_soon, self._fetch_in_background, round_, fetched, slot)
            self.round = round_  # the snapshot stays the last state this peer holds
            return base
        fetched = self._wait_on_network(self.fetch_state, self.round + 1)
        if fetched is not None:
            try:
                self._load(*fetched)
            except StateError as exc:
                log.warning("ignoring a peer's state: %s", exc)
        return None

    async def _fetch_in_background(self, round_: int, fetched: trio.Event, slot: list) -> None:
        try:
            slot[0] = await self.fetch_state(round_)
        finally:
            fetched.set()

    def _apply_pending(self) -> None:
        if self._pending is None:
            return
        done, slot = self._pending
        self._pending = None
        self._wait_on_network(done.wait)
        if self._joining is not None and not self._take_joined_state():
            self.stats.record(None)  # the mean updates weights this peer could not take
            return
        self._apply(self._received(slot[0]), self._pending_base)

    def _take_joined_state(self) -> bool:
        """Load the swarm's state of the round joined (``_join_swarm``), once fetched: True if it
        holds the weights the round averaged under. A newer state is loaded instead (the mean is
        then unused); without either the peer is out of sync, its trainer fetches again."""
        round_, base, fetched, slot = self._joining
        self._joining = None
        self._wait_on_network(fetched.wait)
        state = slot[0]
        try:
            if state is not None and state[0] >= round_ and isinstance(state[1].get("weights"), torch.Tensor):
                joined = state[0] == round_ and weights_digest(state[1]["weights"].float()) == base
                self._load(*state)
                if joined:
                    return True
                log.info("round %d's average is unused: the state fetched is %s", round_,
                         f"round {state[0]}" if state[0] != round_ else "of other weights than the round averaged")
                return False
        except StateError as exc:
            log.warning("ignoring a peer's state: %s", exc)
        log.warning("round %d's average is unused: the swarm's state of that round could not be fetched", round_)
        self.out_of_sync = True
        return False

    def _apply(self, reduced: Reduced | None, base: str) -> None:
        """Outer step with the group's mean pseudo-gradient, of the weights of digest ``base``
        (``_base``). A round no group averaged leaves the
        swarm weights as they were: every survivor of a failed group then holds the same weights
        (stepping alone, each would hold its own), and the peer is out of sync, so its trainer
        fetches the state of a peer whose round did average, if any did."""
        if reduced is None:
            self.out_of_sync = True
            if self.sharded is not None:
                self._wait_on_network(self.sharded.skip, self.round, base)
        elif self.sharded is not None:  # the group's result is the owners' step direction
            self.global_weights = self._wait_on_network(self.sharded.step, self.round, base, self.global_weights,
                                                        reduced.tensors[0].float())
        else:
            self.outer.step(self.global_weights, reduced.tensors[0].float())
        if self.on_applied is not None:
            self.on_applied(self.round, reduced)
        self.round += 1
        self.take_snapshot()

    @property
    def rounds_begun(self) -> int:
        return self.round + (self._pending is not None)

    @property
    def round_progress(self) -> float:
        return self.rounds_begun + min(1.0, self.phase_steps / self.inner_steps)

    def finish(self) -> None:
        self._apply_pending()
        assign_flat(self.params, self.global_weights)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        outer = {} if self.outer is None else {"outer_momentum": self.outer.buffer.clone()}
        return {"weights": self.global_weights.clone(), **outer, **optimizer_tensors(self.inner, "inner")}

    def load_state(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        """Adopt a peer's state (the training thread, at a round end); work in flight is dropped,
        except for a state of this peer's own round (a refetch after a failed round): the round
        being averaged is then the swarm's too, and its mean applies to these weights.
        A state that does not fit raises ``StateError`` and changes nothing."""
        same_round, pending_round = round_ == self.round and self._pending is not None, self.round
        self._load(round_, state)
        self._joining = None  # a state fetched for a round joined is no longer wanted
        if same_round and self.agree_on_weights and self._base() != self._pending_base:
            same_round = False  # the mean being averaged updates other weights than these
        if not same_round and self._pending is not None:
            # its group may still be averaging: the peer finishes its part there (leaving would
            # fail the round for the others), and the result goes unused
            log.info("round %d's average in flight is dropped: it updates weights this peer no longer holds",
                     pending_round)
            self._pending = None
        assign_flat(self.params, self.global_weights)
        self.round_start = self.global_weights.clone()
        self.samples = self.phase_steps = 0
        self._adopt_next = self.overlap and not same_round

    def _load(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        size = torch.Size([len(self.global_weights)])
        check_state(state, {"weights": size, **({} if self.outer is None else {"outer_momentum": size})})
        check_optimizer_tensors(self.inner, "inner", state)
        self.global_weights = state["weights"].float().clone()
        if self.outer is not None:
            self.outer.buffer = state["outer_momentum"].float().clone()
        load_optimizer_tensors(self.inner, "inner", state)
        self._now_at(round_)
