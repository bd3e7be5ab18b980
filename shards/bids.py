"""Bids for shard ownership: each peer's capacity, published as its signed entry in the DHT.

Under ``/legion/<swarm>/shards/<run id>`` every peer that can own shards keeps an entry with its
free memory, upload bandwidth and the time it came up, renewed every heartbeat: the entry's
expiration is the peer's **lease**; a peer that stops renewing (left, killed) loses its shards when
the entry expires. The DHT layer rejects entries whose signature does not match their peer id; this
module rejects the absurd ones (negative, impossible or future values).

Upload is self-declared. A bid also carries the uploads its peer measured of a few peers it averaged
with lately (``seen``), and a peer's upload counts above the median declared one only as far as
another bidder saw it (``believed_uploads``): a claim of 100 Gbit/s from a home line earns it no more
shards than the median, whatever its peer says.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

from dht import RecordDHT

MAX_MEMORY = 1 << 50  # 1 PiB
MAX_UPLOAD_MBIT = 100_000.0  # 100 Gbit/s
CLOCK_SKEW = 30.0
DEFAULT_UPLOAD_MBIT = 10.0  # a peer that does not know its upload is taken for a modest home line
MAX_SEEN = 8  # uploads measured of other peers that one bid carries
SEEN_ID_CHARS = 10  # a measured peer is named by the end of its id (bids are renewed every heartbeat)
MIN_SEEN_MBIT = 0.125  # smaller measurements are vouched for as this
UPTIME_SLACK = 2.0  # an uptime counts up to this many times the median uptime, plus an hour
SEEN_SLACK = 2.0  # a declared upload counts up to this many times the median other bidders measured


def bids_key(swarm: str, run_id: str) -> str:
    return f"/legion/{swarm}/shards/{run_id}"


@dataclass(frozen=True)
class Bid:
    peer_id: str
    free_memory: int  # bytes this peer offers for shard state
    upload_mbit: float
    up_since: float  # unix time the peer started
    renewed: float  # unix time of this renewal
    seen: tuple[tuple[str, float], ...] = ()  # (end of a peer's id, its upload in Mbit/s as measured here)

    @property
    def capacity(self) -> float:
        """What the bid is worth: upload bandwidth, up to twice that for a day of uptime, counted in
        whole hours. (Counted to the second, the peers' shares moved with every renewed bid: peers of
        equal upload split the spare shards by which bid a reader saw last, and on 10 Mbit/s links
        their shards changed 169 times in 6 rounds.)"""
        uptime_hours = math.floor(max(0.0, self.renewed - self.up_since) / 3600)
        return max(1.0, self.upload_mbit) * (1 + min(uptime_hours, 24) / 24)

    def to_value(self) -> dict[str, Any]:
        seen = {"seen": dict(self.seen)} if self.seen else {}
        return {"mem": self.free_memory, "up": self.upload_mbit, "since": self.up_since, "at": self.renewed, **seen}


def parse_bid(peer_id: str, value: Any, now: float | None = None) -> Bid:
    """A bid from its DHT value; raises ``ValueError`` for a malformed or absurd one."""
    now = time.time() if now is None else now
    if not isinstance(value, dict) or not {"mem", "up", "since", "at"} <= set(value) <= {"mem", "up", "since", "at", "seen"}:
        raise ValueError("a bid is a map of mem, up, since, at and maybe seen")
    mem, up, since, at = value["mem"], value["up"], value["since"], value["at"]
    if not (isinstance(mem, int) and 0 <= mem <= MAX_MEMORY):
        raise ValueError(f"free memory {mem!r:.40} is not a byte count up to 1 PiB")
    if not (isinstance(up, (int, float)) and math.isfinite(up) and 0 <= up <= MAX_UPLOAD_MBIT):
        raise ValueError(f"upload {up!r:.40} Mbit/s is not plausible")
    if not (isinstance(since, (int, float)) and isinstance(at, (int, float))
            and 1.5e9 < since <= at <= now + CLOCK_SKEW):
        raise ValueError("bid times are not plausible (start after renewal, or in the future)")
    return Bid(peer_id, mem, float(up), float(since), float(at), _parse_seen(value.get("seen", {})))


def _parse_seen(seen: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(seen, dict) or len(seen) > MAX_SEEN:
        raise ValueError(f"a bid's measured uploads are a map of at most {MAX_SEEN}")
    for suffix, mbit in seen.items():
        if not (isinstance(suffix, str) and 0 < len(suffix) <= SEEN_ID_CHARS):
            raise ValueError("a measured peer is named by the end of its id")
        if not (type(mbit) in (int, float) and math.isfinite(mbit) and 0 <= mbit <= MAX_UPLOAD_MBIT):
            raise ValueError(f"measured upload {mbit!r:.40} Mbit/s is not plausible")
    return tuple(sorted((suffix, float(mbit)) for suffix, mbit in seen.items()))


def seen_of(uploads: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """What a bid carries of ``uploads`` (peer id -> Mbit/s measured): the ``MAX_SEEN`` fastest,
    each named by the end of its id and rounded down to a power of two. Only a peer above the median
    needs a measurement, and the same few values from round to round keep the owners from flapping:
    with each round's own figure (to 0.1 Mbit/s) a liar's believed upload moved with every renewed
    bid, and on 10 Mbit/s links the peers' shards changed 140 times in 6 rounds (50 with no liar)."""
    fastest = sorted(uploads.items(), key=lambda item: (-item[1], item[0]))[:MAX_SEEN]
    return tuple(sorted((peer[-SEEN_ID_CHARS:], _power_of_two_below(min(mbit, MAX_UPLOAD_MBIT)))
                        for peer, mbit in fastest))


def _power_of_two_below(mbit: float) -> float:
    return 2.0 ** math.floor(math.log2(max(mbit, MIN_SEEN_MBIT)))


def believed_uploads(bids: list[Bid]) -> list[Bid]:
    """``bids`` with each upload counted above the median declared upload only as far as
    ``SEEN_SLACK`` times the median of what the other bidders measured of it (a peer's own word
    about itself, or about itself under another name, is not a measurement). A measurement is one
    contribution stream's rate (``RoundStats.uploads_seen``): a sender cannot make it exceed its
    upload, though an owner slow to read (a loaded machine) sees buffered bytes come at once, hence
    the median: on 10 Mbit/s links the most any owner saw of a liar was 13.2 Mbit/s, the median ~2.
    A peer sending to all its group's owners at once shows a share of its upload, so a fast honest
    peer counts above the median only where its streams alone outran twice the median."""
    if not bids:
        return []
    median = statistics.median(bid.upload_mbit for bid in bids)
    named = {bid.peer_id[-SEEN_ID_CHARS:]: bid.peer_id for bid in bids}
    measured: dict[str, list[float]] = {}
    for bid in bids:
        for suffix, mbit in bid.seen:
            peer = named.get(suffix)
            if peer is not None and peer != bid.peer_id:
                measured.setdefault(peer, []).append(mbit)
    return [replace(bid, upload_mbit=min(bid.upload_mbit, max(median, SEEN_SLACK * statistics.median(
        measured.get(bid.peer_id, [0.0]))))) for bid in bids]


def believed_uptimes(bids: list[Bid]) -> list[Bid]:
    """``bids`` with each uptime (which counts towards a bid's worth, ``Bid.capacity``) believed up to
    twice the median uptime plus an hour. Uptime is self-declared: a liar claiming a day in a young
    swarm doubled its bid (``bench/attack.py --link-mbit 10``: 7 of 32 replicas where its fair share
    was 4)."""
    if not bids:
        return []
    limit = UPTIME_SLACK * statistics.median(max(0.0, b.renewed - b.up_since) for b in bids) + 3600
    return [replace(b, up_since=max(b.up_since, b.renewed - limit)) for b in bids]


async def read_bids(dht: RecordDHT, swarm: str, run_id: str) -> list[Bid]:
    """The live bids for ``run_id``'s shards; bad ones are dropped and logged."""
    return await dht.get_parsed(bids_key(swarm, run_id), parse_bid, "shard bid")
