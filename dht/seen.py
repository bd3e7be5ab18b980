"""The entries a node's last read of each key found, and what each replica told it with which
token, so its next read of the key asks replicas for the others only (``dht.records.encode_read``)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

from dht.records import Entry

SEEN_KEYS = 256  # keys remembered (a seeker reads a few a round, an owner one per cell)
SEEN_ENTRIES = 16384  # entries remembered, all keys together (what replicas can make a node hold)

# A replica's last answer to this node about a key: its token, and the digests of the entries it
# holds (those it sent, and those of this node's it named)
ReplicaView = tuple[bytes, frozenset[bytes]]


@dataclass
class _Read:
    entries: list[Entry]
    views: dict[Hashable, ReplicaView] = field(default_factory=dict)


class SeenEntries:
    """The live entries each recently read key held, and each replica's view of them, the least
    recently read key forgotten first beyond ``max_keys`` keys or ``max_entries`` entries. A
    replica's view is bounded by the entries: it names only entries this node read."""

    def __init__(self, max_keys: int = SEEN_KEYS, max_entries: int = SEEN_ENTRIES) -> None:
        self.max_keys, self.max_entries = max_keys, max_entries
        self._keys: OrderedDict[bytes, _Read] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def get(self, key: bytes) -> list[Entry]:
        """The live entries ``key`` held at its last read ([] if none is remembered)."""
        now = time.time()
        read = self._keys.get(key)
        return [] if read is None else [e for e in read.entries if e.expiration > now]

    def views(self, key: bytes) -> dict[Hashable, ReplicaView]:
        """Each replica's last answer about ``key`` ({} if none is remembered)."""
        read = self._keys.get(key)
        return {} if read is None else dict(read.views)

    def remember(self, key: bytes, entries: list[Entry], views: dict[Hashable, ReplicaView] | None = None) -> None:
        old = self._keys.pop(key, None)
        self._count -= len(old.entries) if old else 0
        if not entries or len(entries) > self.max_entries:
            return
        self._keys[key] = _Read(entries, dict(views or {}))
        self._count += len(entries)
        while len(self._keys) > self.max_keys or self._count > self.max_entries:
            self._count -= len(self._keys.popitem(last=False)[1].entries)
