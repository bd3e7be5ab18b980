"""Latency-aware group formation: the same candidates give every peer the same groups.

Peers place themselves with Vivaldi network coordinates (2-D plus a height for the access link),
learned from measured round trips and published with their matchmaking entry, so the distance
between two candidates estimates their RTT without anyone measuring all pairs. Groups are grown
around seeds taken in an order salted by the round, so membership rotates from round to round
(Moshpit-style), and every ``mix_every``-th round ignores latency so that regional groups still
mix globally.

Nothing in a split may depend on how much of the swarm a peer happens to see: peers read the
matchmaking entries from the DHT, and views that differ by one entry must still agree on almost
every group. So the salt is the round's key alone, and from twice the target size on, peers are
spread over buckets (``bucket_of``) by a hash of their own id and the round's rotation
(``rotation_of``: its place in a cycle of rounds): each bucket has its own DHT key, holds about one
group, and a missing entry changes only the group it belonged to.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Callable


@dataclass
class Coordinates:
    """A Vivaldi coordinate (milliseconds): position ``x, y`` and access-link height ``h``."""

    x: float = 0.0
    y: float = 0.0
    h: float = 0.1
    error: float = 1.0

    def distance(self, other: "Coordinates") -> float:
        return math.hypot(self.x - other.x, self.y - other.y) + self.h + other.h

    def update(self, other: "Coordinates", rtt_ms: float, ce: float = 0.25, cc: float = 0.25) -> None:
        """One Vivaldi step towards agreeing with a measured round trip to ``other``."""
        if not (rtt_ms > 0 and math.isfinite(rtt_ms)):
            return
        predicted = self.distance(other)
        weight = self.error / max(self.error + other.error, 1e-9)
        sample_error = abs(predicted - rtt_ms) / rtt_ms
        self.error = min(1.0, sample_error * ce * weight + self.error * (1 - ce * weight))
        step = cc * weight * (rtt_ms - predicted)
        dx, dy = self.x - other.x, self.y - other.y
        norm = math.hypot(dx, dy)
        if norm < 1e-9:  # same spot: push apart in a random direction
            angle = random.uniform(0, 2 * math.pi)
            dx, dy, norm = math.cos(angle), math.sin(angle), 1.0
        self.x += step * dx / norm
        self.y += step * dy / norm
        self.h = max(0.1, self.h + step * 0.1)

    def to_wire(self) -> list[float]:
        return [round(self.x, 3), round(self.y, 3), round(self.h, 3)]

    @classmethod
    def from_wire(cls, wire: object) -> "Coordinates":
        if isinstance(wire, list) and len(wire) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                             and abs(v) < 1e6 for v in wire):
            return cls(float(wire[0]), float(wire[1]), max(0.0, float(wire[2])))
        return cls()


def _salted(salt: str, peer: str) -> bytes:
    return hashlib.sha256(f"{salt}/{peer}".encode()).digest()


# Peers a bucket holds on average at the most (at least half as many), whatever the group size: a
# bucket is drawn by hash, and one that draws a single peer leaves it nobody to average with. With
# buckets sized by groups of 3, 6 peers drew 2 buckets, one of them often one peer, which failed
# its round (5 of 48 peer-rounds); with 8 to 16 on average, at most 1 bucket in ~370 draws one.
BUCKET_PEERS = 16


# Rounds after which a peer's matchmaking buckets repeat (``rotation_of``): the DHT nodes of its
# keys are then looked up once every few rounds, not every round, and the swarm still mixes: each
# round of the cycle splits it by another draw (Moshpit SGD cycles through the dimensions of a grid).
ROTATION_ROUNDS = 4


def rotation_of(series: str, round_: int) -> str:
    """Round ``round_`` of ``series``'s place in its cycle of ``ROTATION_ROUNDS`` (the same at every peer)."""
    return f"{series}@{round_ % ROTATION_ROUNDS}"


def bucket_count(swarm_size: int, target: int, bucket_peers: int = BUCKET_PEERS) -> int:
    """How many matchmaking buckets a round of ``swarm_size`` peers uses: one below twice
    ``size = max(target, bucket_peers)``, else a power of two that leaves ``size / 2 .. size``
    peers in each on average. A power of two, so two peers whose estimates of the swarm straddle a
    doubling still nest: a bucket of the smaller count is exactly two of the larger."""
    size = max(target, bucket_peers)
    if swarm_size < 2 * size:
        return 1
    return 1 << math.ceil(math.log2(swarm_size / size))


def bucket_of(peer: str, salt: str, count: int) -> int:
    """The bucket ``peer`` seeks a group in: a hash of its id and the round, so it is the same in
    every peer's view and membership rotates from round to round."""
    return int.from_bytes(_salted(salt, peer)[:8], "big") % count


def plan_groups(names: list[str], distance: Callable[[str, str], float], target: int, min_size: int,
                key: str, mix_every: int, private: frozenset[str] = frozenset()) -> list[list[str]]:
    """The split every peer seeking under ``key`` computes from the names it sees: salted by the
    key alone (the round and bucket), every ``mix_every``-th key a mixing one."""
    mix = mix_every > 0 and int(hashlib.sha256(key.encode()).hexdigest(), 16) % mix_every == 0
    return form_groups(names, distance, target, min_size, key, mix, private)


def form_groups(peers: list[str], distance: Callable[[str, str], float], target: int, min_size: int,
                salt: str, mix: bool = False, private: frozenset[str] = frozenset()) -> list[list[str]]:
    """Split ``peers`` into groups of ``target`` (the last ones may hold up to ``target + min_size - 1``).

    Deterministic in its inputs. Seeds are taken in salted-hash order; each seed takes the nearest
    unassigned peers (``distance``; ignored when ``mix``). Leftovers too few for a group of
    ``min_size`` join their nearest groups. With ``private`` peers (behind NAT: no one can dial
    them) see ``_groups_with_private``."""
    if target < 1 or min_size < 1:
        raise ValueError("group sizes must be positive")
    order = sorted(set(peers), key=lambda p: _salted(salt, p))
    if private & set(order):
        return _groups_with_private(order, private, target)
    unassigned = list(order)
    groups: list[list[str]] = []
    while len(unassigned) >= min(min_size, len(order)) and unassigned:
        seed = unassigned.pop(0)
        if mix:
            near = unassigned[: target - 1]
        else:
            near = sorted(unassigned, key=lambda p: (distance(seed, p), _salted(salt, p)))[: target - 1]
        for p in near:
            unassigned.remove(p)
        groups.append([seed, *near])
        if len(unassigned) < min_size:
            break
    for p in unassigned:
        nearest = min(groups, key=lambda g: (0 if mix else min(distance(p, q) for q in g), len(g)))
        nearest.append(p)
    return [sorted(g) for g in groups]


def _groups_with_private(order: list[str], private: frozenset[str], target: int) -> list[list[str]]:
    """Groups in which no two peers are private: two peers behind NAT cannot connect to each
    other, and one such pair makes the whole group's round fail. Each private peer gets a group
    of its own among the public ones (more, smaller groups where there are many private peers:
    as many as there are private peers, up to one per public peer); private peers beyond that are
    left in groups of one (their rounds fail, and they say so). ``order`` is salted, so which
    public peers meet rotates between rounds."""
    public = [p for p in order if p not in private]
    behind = [p for p in order if p in private]
    count = min(len(public), max(-(-len(order) // target), len(behind)))
    if count == 0:
        return [[p] for p in behind]
    groups: list[list[str]] = [[] for _ in range(count)]
    for i, peer in enumerate(public):
        groups[i % count].append(peer)
    for group, peer in zip(groups, behind):
        group.append(peer)
    return [sorted(g) for g in groups] + [[p] for p in behind[count:]]
