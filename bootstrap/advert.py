"""Which checkpoint versions a peer holds, advertised in the DHT.

Under ``/legion/<swarm>/checkpoints`` each peer's signed entry lists the versions it holds (run,
manifest id, round, chunks held of total). A joiner reads this to find peers it can fetch a
version from (in a swarm of more than 64 peers, those of its bucket: ``dht.buckets``); which
chunks exactly a peer holds it asks that peer (the chunk protocol's "have").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bootstrap.manifest import ID_BYTES
from dht import RecordDHT
from dht.buckets import BucketPlace

MAX_VERSIONS = 16


def holdings_key(swarm: str) -> str:
    return f"/legion/{swarm}/checkpoints"


@dataclass(frozen=True)
class Holding:
    peer_id: str
    run_id: str
    manifest_id: bytes
    round: int
    held: int  # chunks held
    total: int  # chunks in the version

    def to_item(self) -> list:
        return [self.run_id, self.manifest_id, self.round, self.held, self.total]


def holdings_value(holdings: list[Holding]) -> dict[str, Any]:
    return {"v": [h.to_item() for h in holdings[:MAX_VERSIONS]]}


def parse_holdings(peer_id: str, value: Any) -> list[Holding]:
    items = value.get("v") if isinstance(value, dict) else None
    if not isinstance(items, list) or len(items) > MAX_VERSIONS:
        raise ValueError("holdings are not a list of at most 16 versions")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 5 and isinstance(item[0], str)
                and isinstance(item[1], bytes) and len(item[1]) == ID_BYTES
                and all(isinstance(x, int) and x >= 0 for x in item[2:]) and item[3] <= item[4]):
            raise ValueError(f"malformed version {item!r:.80}")
        out.append(Holding(peer_id, *item))
    return out


def holdings_place(swarm: str, me: str = "") -> BucketPlace[list[Holding]]:
    """``me``'s place in the swarm's checkpoint holdings, kept from read to read."""
    return BucketPlace(holdings_key(swarm), parse_holdings, "checkpoint holdings", me)


async def find_holdings(dht: RecordDHT, place: BucketPlace[list[Holding]]) -> list[Holding]:
    """The versions the peers of ``place``'s bucket hold (every peer's, in a swarm of up to 64)."""
    return [holding for entry in (await place.read(dht)).entries for holding in entry]
