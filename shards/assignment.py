"""Which peers own which shards: one deterministic rule every peer applies to the same bids.

Each shard gets ``replicas`` owners by weighted rendezvous hashing: a peer's score for a shard is
``capacity / -ln(u)`` with ``u`` a hash of (run, shard, peer) in (0, 1); pairs are taken strongest
first, ties by peer id. A peer owns its fair share, ``shards x replicas x capacity / total capacity``
(uploads above the median believed as far as other peers measured them, ``shards.bids.believed_uploads``,
uptimes up to twice the median and an hour, ``believed_uptimes``, and capacities up to 4 times the
median, ``averaging.partition.capped_at_median``)
rounded to whole shards so the shares add up (swaps fill a shard the greedy pass leaves short; then
shares rounded up, then wherever memory allows, fill what is left), and never more than its offered
memory holds, so stronger peers own more and nobody owns everything. A peer
leaving moves mostly its own shards (rendezvous hashing), which keeps handovers small.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from averaging.partition import capped_at_median
from shards.bids import Bid, believed_uploads, believed_uptimes
from shards.layout import ShardLayout


@dataclass(frozen=True)
class Assignment:
    owners: tuple[tuple[str, ...], ...]  # per shard, best first

    def shards_of(self, peer_id: str) -> list[int]:
        return [shard for shard, owners in enumerate(self.owners) if peer_id in owners]

    def under_replicated(self, replicas: int) -> list[int]:
        return [shard for shard, owners in enumerate(self.owners) if len(owners) < replicas]


def _score(salt: str, shard: int, peer_id: str, capacity: float) -> float:
    digest = hashlib.sha256(f"{salt}/{shard}/{peer_id}".encode()).digest()
    u = (int.from_bytes(digest[:8], "big") + 1) / (2 ** 64 + 2)
    return capacity / -math.log(u)


def _quotas(fair: dict[str, float], slots: int) -> dict[str, int]:
    """Fair shares in whole shards summing to ``slots`` (largest remainders get the spare ones, ties
    by peer id), at least one each. Rounding each share up on its own would let peers of nearly
    equal capacity (4.0001 and 3.9999 shards) end with 5 and 3."""
    quota = {p: math.floor(f) for p, f in fair.items()}
    spare = slots - sum(quota.values())
    for p in sorted(fair, key=lambda p: (quota[p] - fair[p], p))[:max(0, spare)]:
        quota[p] += 1
    return {p: max(1, q) for p, q in quota.items()}


def assign(bids: list[Bid], layout: ShardLayout, replicas: int, *, state_bytes_per_value: int,
           salt: str) -> Assignment:
    """Owners of every shard of ``layout``; a shard holds ``state_bytes_per_value`` bytes of
    optimizer state per parameter. ``salt`` (the run id) decorrelates runs."""
    if replicas < 1:
        raise ValueError("at least one owner per shard")
    by_peer = {bid.peer_id: bid for bid in sorted(believed_uptimes(believed_uploads(bids)), key=lambda b: b.peer_id)}
    copies = min(replicas, len(by_peer))
    if not copies:
        return Assignment(tuple(() for _ in range(layout.count)))
    # bids are self-declared: one claiming 100 Gbit/s must not win a replica of every shard
    capacity = dict(zip(by_peer, capped_at_median([bid.capacity for bid in by_peer.values()])))
    total = sum(capacity.values())
    largest = max(layout.size(s) for s in range(layout.count)) * state_bytes_per_value
    room = {peer: bid.free_memory // largest for peer, bid in by_peer.items()}  # a hard bound
    fair = {peer: layout.count * copies * capacity[peer] / total for peer in by_peer}
    # every (shard, peer) pair, strongest first: the strongest pairs hold whatever else changes
    pairs = sorted(((-_score(salt, shard, p, capacity[p]), p, shard)
                    for shard in range(layout.count) for p in by_peer))
    owners: list[list[str]] = [[] for _ in range(layout.count)]
    owned = dict.fromkeys(by_peer, 0)
    quota = {p: min(q, room[p]) for p, q in _quotas(fair, layout.count * copies).items()}
    # Best scores first within each peer's fair share rounded to whole shards, then rounded up, then
    # wherever memory allows (the greedy passes can leave a shard short when quotas run out unevenly).
    for limit in (quota, {p: math.ceil(f) for p, f in fair.items()}, room):
        for _, peer, shard in pairs:
            if len(owners[shard]) < copies and peer not in owners[shard] and owned[peer] < min(limit[peer], room[peer]):
                owners[shard].append(peer)
                owned[peer] += 1
        if limit is quota:
            _fill_by_swaps(owners, owned, quota, copies)
    return Assignment(tuple(tuple(o) for o in owners))


def _fill_by_swaps(owners: list[list[str]], owned: dict[str, int], quota: dict[str, int], copies: int) -> None:
    """The greedy pass ends with a shard short of owners when the only peers below their quota
    already own it: then one of them takes a place in another shard whose owner moves to the short one."""
    for short in range(len(owners)):
        while len(owners[short]) < copies:
            spare = [p for p in sorted(owned) if owned[p] < quota[p]]
            move = next(((shard, owner, peer) for peer in spare for shard, held in enumerate(owners)
                         if peer not in held for owner in held if owner not in owners[short]), None)
            if move is None:
                return  # the later passes place what is left
            shard, owner, peer = move
            owners[shard][owners[shard].index(owner)] = peer
            owners[short].append(owner)
            owned[peer] += 1
