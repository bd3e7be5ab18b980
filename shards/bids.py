"""Bids for shard ownership: each peer's capacity, published as its signed entry in the DHT.

Under ``/legion/<swarm>/shards/<run id>`` every peer that can own shards keeps an entry with its
free memory, upload bandwidth and the time it came up, renewed every heartbeat: the entry's
expiration is the peer's **lease**; a peer that stops renewing (left, killed) loses its shards when
the entry expires. The DHT layer rejects entries whose signature does not match their peer id; this
module rejects the absurd ones (negative, impossible or future values).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from dht import RecordDHT

MAX_MEMORY = 1 << 50  # 1 PiB
MAX_UPLOAD_MBIT = 100_000.0  # 100 Gbit/s
CLOCK_SKEW = 30.0
DEFAULT_UPLOAD_MBIT = 10.0  # a peer that does not know its upload is taken for a modest home line


def bids_key(swarm: str, run_id: str) -> str:
    return f"/legion/{swarm}/shards/{run_id}"


@dataclass(frozen=True)
class Bid:
    peer_id: str
    free_memory: int  # bytes this peer offers for shard state
    upload_mbit: float
    up_since: float  # unix time the peer started
    renewed: float  # unix time of this renewal

    @property
    def capacity(self) -> float:
        """What the bid is worth: upload bandwidth, up to twice that for a day of uptime."""
        uptime_hours = max(0.0, self.renewed - self.up_since) / 3600
        return max(1.0, self.upload_mbit) * (1 + min(uptime_hours, 24.0) / 24)

    def to_value(self) -> dict[str, Any]:
        return {"mem": self.free_memory, "up": self.upload_mbit, "since": self.up_since, "at": self.renewed}


def parse_bid(peer_id: str, value: Any, now: float | None = None) -> Bid:
    """A bid from its DHT value; raises ``ValueError`` for a malformed or absurd one."""
    now = time.time() if now is None else now
    if not isinstance(value, dict) or set(value) != {"mem", "up", "since", "at"}:
        raise ValueError("a bid is a map of mem, up, since, at")
    mem, up, since, at = value["mem"], value["up"], value["since"], value["at"]
    if not (isinstance(mem, int) and 0 <= mem <= MAX_MEMORY):
        raise ValueError(f"free memory {mem!r:.40} is not a byte count up to 1 PiB")
    if not (isinstance(up, (int, float)) and math.isfinite(up) and 0 <= up <= MAX_UPLOAD_MBIT):
        raise ValueError(f"upload {up!r:.40} Mbit/s is not plausible")
    if not (isinstance(since, (int, float)) and isinstance(at, (int, float))
            and 1.5e9 < since <= at <= now + CLOCK_SKEW):
        raise ValueError("bid times are not plausible (start after renewal, or in the future)")
    return Bid(peer_id, mem, float(up), float(since), float(at))


async def read_bids(dht: RecordDHT, swarm: str, run_id: str) -> list[Bid]:
    """The live bids for ``run_id``'s shards; bad ones are dropped and logged."""
    return await dht.get_parsed(bids_key(swarm, run_id), parse_bid, "shard bid")
