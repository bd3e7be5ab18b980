"""Shard ownership in a swarm: a training peer's bid and its view of the owners, and
``legion-peer status --shards``."""

from __future__ import annotations

import statistics
import time
from collections import deque

import trio

from dht import RecordDHT
from shards.assignment import Assignment, assign
from shards.bids import DEFAULT_UPLOAD_MBIT, Bid, bids_key, read_bids, seen_of
from shards.layout import ShardLayout
from swarm.run_board import read_run_configs
from swarm.run_config import RunConfig

STATE_BYTES_PER_VALUE = 4  # the outer optimizer's float32 momentum
LEASE_LIFETIMES = 3  # a bid no read shows any more still counts this many lease lifetimes
SEEN_SECONDS = 600.0  # how long a measurement of a peer's upload is vouched for in this peer's bid
MAX_MEASURED = 256  # peers whose measured upload a peer keeps
MEASUREMENTS_KEPT = 8  # of each, the last this many


def run_assignment(config: RunConfig, bids: list[Bid]) -> tuple[ShardLayout, Assignment]:
    layout = ShardLayout(config.model_config().num_params(), config.shards)
    return layout, assign(bids, layout, config.replicas, state_bytes_per_value=STATE_BYTES_PER_VALUE,
                          salt=config.run_id)


async def bid_and_assign(dht: RecordDHT, swarm: str, config: RunConfig, bid: Bid, ttl: float,
                         seen: dict[str, Bid]) -> Assignment:
    """Renew this peer's bid (its lease) and return the owners every peer computes from the bids.

    ``seen`` keeps the newest bid read from each peer for ``LEASE_LIFETIMES`` of its lease (``ttl``
    from its renewal): a DHT read that misses some bids (a loaded node answering late, a renewal
    that took a few seconds) must not shrink this peer's view, or it would assign itself shards the
    other peers give to the missing bidders. With one lifetime, a chaos run on 2 cores saw a peer's
    view flip between 16 shards, 4 and 5 within 15 s, every flip a handover and some a shard whose
    momentum nobody held any more; a bidder that is really gone now keeps its shards ~3 lifetimes,
    while its replica serves them."""
    with trio.move_on_after(ttl / 2):
        await dht.store(bids_key(swarm, config.run_id), bid.to_value(), ttl)
    for read in await read_bids(dht, swarm, config.run_id):
        if read.peer_id != bid.peer_id and (read.peer_id not in seen or seen[read.peer_id].renewed < read.renewed):
            seen[read.peer_id] = read
    for peer_id in [p for p, b in seen.items() if b.renewed + LEASE_LIFETIMES * ttl < bid.renewed]:
        del seen[peer_id]
    return run_assignment(config, [*seen.values(), bid])[1]


class MeasuredUploads:
    """The uploads this peer measured of the peers it averaged with (``RoundReport.uploads_seen``),
    for its bid: of each peer measured within ``SEEN_SECONDS``, the median of its last
    ``MEASUREMENTS_KEPT`` measurements (one round's alone varies several-fold on a loaded machine)."""

    def __init__(self) -> None:
        self._measured: dict[str, tuple[deque[float], float]] = {}  # peer -> (its last Mbit/s, when last)

    def add(self, uploads: dict[str, float]) -> None:
        now = time.monotonic()
        for peer, mbit in uploads.items():
            recent, _ = self._measured.pop(peer, (deque(maxlen=MEASUREMENTS_KEPT), 0.0))
            recent.append(mbit)
            self._measured[peer] = (recent, now)
        while len(self._measured) > MAX_MEASURED:  # the oldest first
            del self._measured[next(iter(self._measured))]

    def current(self) -> dict[str, float]:
        since = time.monotonic() - SEEN_SECONDS
        return {peer: statistics.median(recent) for peer, (recent, when) in self._measured.items() if when >= since}


def own_bid(peer_id: str, started_at: float, upload_mbit: float | None, free_memory: int,
            measured: dict[str, float] | None = None) -> Bid:
    return Bid(peer_id, free_memory, upload_mbit or DEFAULT_UPLOAD_MBIT, started_at, time.time(),
               seen_of(measured or {}))


async def fetch_shard_status(dht: RecordDHT, swarm: str, configs: dict[str, RunConfig] | None = None, *,
                             sharded_only: bool = False) -> list[dict]:
    """For every run published (or of ``configs``, already read): its shards, their owners and
    each owner's lease age."""
    configs = await read_run_configs(dht, swarm) if configs is None else configs
    runs = {run_id: config for run_id, config in configs.items() if config.sharded or not sharded_only}
    now = time.time()
    out = []
    for run_id, config in runs.items():
        bids = await read_bids(dht, swarm, run_id)
        layout, assignment = run_assignment(config, bids)
        renewed = {bid.peer_id: bid.renewed for bid in bids}
        out.append({"run_id": run_id, "replicas": config.replicas, "shards": [
            {"shard": shard, "values": layout.size(shard),
             "owners": [{"peer_id": p, "lease_age_seconds": round(now - renewed[p], 1)} for p in owners]}
            for shard, owners in enumerate(assignment.owners)]})
    return out


def format_shard_table(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        lines.append(f"run {run['run_id']}: {len(run['shards'])} shards, {run['replicas']} replicas each")
        for shard in run["shards"]:
            owners = ", ".join(f"{o['peer_id']} ({o['lease_age_seconds']:.0f}s)" for o in shard["owners"]) or "none"
            short = "" if len(shard["owners"]) >= run["replicas"] else "  UNDER-REPLICATED"
            lines.append(f"  shard {shard['shard']:>3}  {shard['values']:>10} values  {owners}{short}")
    return "\n".join(lines) if lines else "no training run in this swarm"
