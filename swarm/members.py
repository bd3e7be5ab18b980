"""The swarm's member list: one signed entry per live peer, under one DHT key split into buckets
in a swarm of more than 64 peers (``dht.buckets``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dht import RecordDHT
from dht.buckets import BucketPlace, BucketRead, read_every_bucket

ROLES = ("seed", "peer")
# While the member list is one key (up to 64-80 peers), its writers refresh about this many entries
# a heartbeat in all: each every heartbeat up to 16 peers (a kill shows within 3 heartbeats there),
# every 4 at 64. Rounds go by the run board, not the member list (status, addresses to connect
# ahead), and 64 peers' refreshes every heartbeat were a third of their DHT requests.
MEMBER_REFRESHES_PER_BEAT = 16


def members_key(swarm: str) -> str:
    return f"/legion/{swarm}/members"


@dataclass(frozen=True)
class Announcement:
    """What a peer says about itself. The peer id is the entry's signed subkey, not a field."""

    addrs: list[str]
    role: str
    version: str
    started_at: float
    cpu_cores: int
    ram_bytes: int
    gpu: str | None
    upload_mbps: float | None
    download_mbps: float | None
    bandwidth_source: str = "unknown"
    reachability: str = "unknown"  # public / private / unknown, from other peers' dial-backs (swarm.reachability)
    peer_id: str = field(default="", compare=False)

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        del value["peer_id"]
        return value

    @classmethod
    def from_value(cls, peer_id: str, value: Any) -> "Announcement":
        """Parse a DHT value; raises ``ValueError`` for anything malformed."""
        if not isinstance(value, dict):
            raise ValueError("announcement is not a map")
        optional = {"reachability"}  # newer than the other fields: peers of older versions lack it
        fields = [name for name in cls.__dataclass_fields__ if name != "peer_id"]
        try:
            ann = cls(peer_id=peer_id, **{name: value[name] for name in fields if name not in optional or name in value})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"announcement lacks a field: {exc}") from exc
        checks = [
            isinstance(ann.addrs, list) and all(isinstance(a, str) for a in ann.addrs),
            ann.role in ROLES,
            isinstance(ann.version, str),
            isinstance(ann.started_at, (int, float)),
            isinstance(ann.cpu_cores, int) and isinstance(ann.ram_bytes, int),
            ann.gpu is None or isinstance(ann.gpu, str),
            all(b is None or isinstance(b, (int, float)) for b in (ann.upload_mbps, ann.download_mbps)),
            isinstance(ann.bandwidth_source, str),
            isinstance(ann.reachability, str) and len(ann.reachability) <= 16,
        ]
        if not all(checks):
            raise ValueError("announcement has a field of the wrong type")
        return ann

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {"peer_id": self.peer_id, **self.to_value(), "uptime_seconds": round(max(0.0, now - self.started_at), 1)}


def member_place(swarm: str, me: str = "") -> BucketPlace[Announcement]:
    """``me``'s place in the swarm's member list, kept from read to read (a random bucket without ``me``)."""
    return BucketPlace(members_key(swarm), Announcement.from_value, "announcement", me,
                       unsplit_refreshes_per_beat=MEMBER_REFRESHES_PER_BEAT)


def seeds_first(members: list[Announcement]) -> list[Announcement]:
    return sorted(members, key=lambda a: (a.role != "seed", a.started_at, a.peer_id))


async def live_members(dht: RecordDHT, swarm: str, me: str = "") -> BucketRead[Announcement]:
    """Unexpired announcements of ``me``'s bucket of the swarm (all of them in a swarm of up to
    64 peers; a random bucket without ``me``), seeds first, malformed ones dropped and logged."""
    read = await member_place(swarm, me).read(dht)
    return BucketRead(seeds_first(read.entries), read.estimate, read.level)


async def every_member(dht: RecordDHT, swarm: str) -> BucketRead[Announcement]:
    """Every live announcement, read bucket by bucket (``legion-peer status --all``)."""
    read = await read_every_bucket(dht, members_key(swarm), Announcement.from_value, "announcement")
    return BucketRead(seeds_first(read.entries), read.estimate, read.level)
