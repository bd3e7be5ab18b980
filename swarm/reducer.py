"""The reducer a swarm optimizer averages through: an ``Averager`` with round-keyed groups."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import trio

import torch

from averaging.allreduce import RoundFailed
from averaging.averager import Averager, RoundPlan
from averaging.groups import rotation_of
from averaging.matchmaking import MatchmakingFailed
from optim.base import Reduced

log = logging.getLogger(__name__)

FAILURES_TO_WARN = 3  # rounds in a row that averaged nothing before the peer says so loudly
LOST_PEERS_TIMEOUTS = 3  # round timeouts after the others were last seen in which a round waits for them
EXPECTED_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class RoundReport:
    """How one round went, for whoever watches the peer (metrics, the run board)."""

    key: str
    outcome: str  # averaged / alone / failed
    seconds: float
    members: list[str] = field(default_factory=list)  # the contributors of an averaged round
    phase_seconds: dict[str, float] = field(default_factory=dict)  # matchmaking, exchange, repair
    bytes_sent: int = 0
    bytes_received: int = 0
    reason: str = ""  # why a failed round failed
    group: str = ""  # the group's id (averaged rounds): one round may be averaged in two groups
    uploads_seen: dict[str, float] = field(default_factory=dict)  # member -> its upload as measured here, Mbit/s


class SwarmReducer:
    """Averages through an ``Averager`` with the peers of the same run, in groups keyed by round.
    Alone in the run it returns the tensors unchanged; when others train but no group averaged, None.

    A peer that trained with others and no longer sees any (a partition, its DHT reads failing)
    waits up to a round timeout for them to show again, for ``LOST_PEERS_TIMEOUTS`` round timeouts
    after it last saw them, before it steps rounds alone, and says so: in a chaos run a partitioned
    peer stepped 11 rounds alone in 40 s, silently, and ended the run with weights no one else held."""

    def __init__(self, averager: Averager, run_id: str, expected_peers: Callable[[], int], *,
                 max_group: int = 16, timeout: float = 60.0) -> None:
        self.averager, self.run_id, self.expected_peers = averager, run_id, expected_peers
        self.max_group, self.timeout = max_group, timeout
        self.failures: list[str] = []  # why each round since the last one averaged failed
        self.listeners: list[Callable[[RoundReport], None]] = []  # told of every round as it ends
        self.others_finished: Callable[[], bool] = lambda: False  # whether peers of the run finished it
        self._others_seen_at: float | None = None  # trio time others were last expected in a round
        self._alone_since_said = False

    async def open_to_join(self, key: str) -> str | None:
        """Whether peers of the run seek a group for round ``key`` now and wait for more peers: the
        base most of them declare (the digest of the weights they update), or None."""
        return await self.averager.matchmaker.open_base(f"{self.run_id}/{key}", self._rotation(key))

    def _rotation(self, key: str) -> str | None:
        """Round ``key``'s place in its series' cycle (``groups.rotation_of``): round keys end with
        the round's number ("diloco-12"); None for another key."""
        series, _, number = key.rpartition("-")
        return rotation_of(f"{self.run_id}/{series}", int(number)) if series and number.isdigit() else None

    async def __call__(self, tensors: list[torch.Tensor], weight: float, codec: str, key: str,
                       plan: RoundPlan | None = None, base: str = "") -> Reduced | None:
        started = trio.current_time()
        expected = await self._expected_after_losing_others(key)
        if expected < 2:
            reduced = Reduced(tensors if plan is None else await self.averager.transform_alone(tensors, plan), 1)
            self._report(RoundReport(key, "alone", trio.current_time() - started))
            return reduced
        self.averager.matchmaker.target_size = min(self.max_group, expected)
        self.averager.matchmaker.swarm_size = expected
        try:
            result = await self.averager.all_reduce(
                tensors, weight=weight, codec=codec, timeout=self.timeout, group_key=f"{self.run_id}/{key}",
                matchmaking_timeout=2 * self.averager.matchmaker.budget, plan=plan, base=base,
                across_groups=bool(base), rotation=self._rotation(key))
        except MatchmakingFailed as exc:
            log.info("round %s: %s", key, exc)
            return self._failed(key, str(exc), started)
        except RoundFailed as exc:
            log.warning("round %s failed: %s", key, exc)
            return self._failed(key, str(exc), started)
        self.failures.clear()
        stats = result.stats
        seconds = trio.current_time() - started
        phases = {"matchmaking": max(0.0, seconds - sum(stats.phase_seconds.values())), **stats.phase_seconds}
        self._report(RoundReport(key, "averaged" if len(stats.contributors) > 1 else "alone", seconds,
                                 list(stats.contributors), phases, stats.bytes_sent, stats.bytes_received,
                                 group=stats.group_id,
                                 uploads_seen={p: rate * 8 / 1e6 for p, rate in stats.uploads_seen.items()}))
        return Reduced(result.tensors, len(stats.contributors), stats.bytes_sent, stats.bytes_received,
                       tuple(sorted(stats.contributors)))

    async def _expected_after_losing_others(self, key: str) -> int:
        """The peers expected in round ``key``; when none but this one, and others were seen
        lately, after waiting up to a round timeout for them to show again."""
        expected = self.expected_peers()
        now = trio.current_time()
        if expected >= 2:
            self._others_seen_at, self._alone_since_said = now, False
            return expected
        if self._others_seen_at is None or self.others_finished():  # alone from the start, or the others are done
            return expected
        grace_ends = self._others_seen_at + LOST_PEERS_TIMEOUTS * self.timeout
        if now < grace_ends:
            log.warning("round %s: no other peer of the run seen for %.0f s; waiting up to %.0f s for them "
                        "before stepping alone", key, now - self._others_seen_at, min(self.timeout, grace_ends - now))
            with trio.move_on_at(min(now + self.timeout, grace_ends)):
                while expected < 2:
                    await trio.sleep(EXPECTED_POLL_SECONDS)
                    expected = self.expected_peers()
            if expected >= 2:
                log.info("round %s: %d peers of the run seen again", key, expected)
                self._others_seen_at = trio.current_time()
                return expected
        if not self._alone_since_said:
            self._alone_since_said = True
            log.warning("round %s: no other peer of the run seen for %.0f s: this peer steps its rounds alone "
                        "until one shows again", key, trio.current_time() - self._others_seen_at)
        return expected

    def _report(self, report: RoundReport) -> None:
        for listener in self.listeners:
            listener(report)

    def _failed(self, key: str, reason: str, started: float) -> None:
        """Count a round that averaged nothing though others train; say so loudly once it repeats."""
        self._report(RoundReport(key, "failed", trio.current_time() - started, reason=reason))
        self.failures.append(reason)
        if len(self.failures) in (FAILURES_TO_WARN, 4 * FAILURES_TO_WARN):
            log.error("this peer has averaged nothing with the swarm for %d rounds (last: %s). Peers behind "
                      "NAT need a port others can dial: forward one and pass --announce, or join from a "
                      "public host", len(self.failures), reason)
        return None
