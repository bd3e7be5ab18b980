"""Which peers own which shards: one deterministic rule every peer applies to the same bids.

Each shard gets ``replicas`` owners by weighted rendezvous hashing: a peer's score for a shard is
``capacity / -ln(u)`` with ``u`` a hash of (run, shard, peer) in (0, 1); pairs are taken strongest
first, ties by peer id. A peer owns about its fair share, ``shards x replicas x capacity / total capacity`` (passes
within the share rounded down, then up, then wherever memory allows fill every shard) and never
more than its offered memory holds, so stronger peers own more and nobody owns everything. A peer
leaving moves mostly its own shards (rendezvous hashing), which keeps handovers small.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from shards.bids import Bid
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


def assign(bids: list[Bid], layout: ShardLayout, replicas: int, *, state_bytes_per_value: int,
           salt: str) -> Assignment:
    """Owners of every shard of ``layout``; a shard holds ``state_bytes_per_value`` bytes of
    optimizer state per parameter. ``salt`` (the run id) decorrelates runs."""
    if replicas < 1:
        raise ValueError("at least one owner per shard")
    by_peer = {bid.peer_id: bid for bid in sorted(bids, key=lambda b: b.peer_id)}
    copies = min(replicas, len(by_peer))
    if not copies:
        return Assignment(tuple(() for _ in range(layout.count)))
    total = sum(bid.capacity for bid in by_peer.values())
    largest = max(layout.size(s) for s in range(layout.count)) * state_bytes_per_value
    room = {peer: bid.free_memory // largest for peer, bid in by_peer.items()}  # a hard bound
    fair = {peer: layout.count * copies * bid.capacity / total for peer, bid in by_peer.items()}
    # every (shard, peer) pair, strongest first: the strongest pairs hold whatever else changes
    pairs = sorted(((-_score(salt, shard, p, by_peer[p].capacity), p, shard)
                    for shard in range(layout.count) for p in by_peer))
    owners: list[list[str]] = [[] for _ in range(layout.count)]
    owned = dict.fromkeys(by_peer, 0)
    # Best scores first within each peer's fair share rounded down, then rounded up, then wherever
    # memory allows (the greedy passes can leave a shard short when quotas run out unevenly).
    for limit in ({p: max(1, math.floor(f)) for p, f in fair.items()}, {p: math.ceil(f) for p, f in fair.items()},
                  room):
        for _, peer, shard in pairs:
            if len(owners[shard]) < copies and peer not in owners[shard] and owned[peer] < min(limit[peer], room[peer]):
                owners[shard].append(peer)
                owned[peer] += 1
    return Assignment(tuple(tuple(o) for o in owners))
