"""The entries a node's last read of each key found, so its next read of the key asks replicas
for the others only (``dht.records.encode_known``)."""

from __future__ import annotations

import time
from collections import OrderedDict

from dht.records import Entry

SEEN_KEYS = 256  # keys remembered (a seeker reads a few a round, an owner one per cell)
SEEN_ENTRIES = 16384  # entries remembered, all keys together (what replicas can make a node hold)


class SeenEntries:
    """The live entries each recently read key held, the least recently read key forgotten first
    beyond ``max_keys`` keys or ``max_entries`` entries."""

    def __init__(self, max_keys: int = SEEN_KEYS, max_entries: int = SEEN_ENTRIES) -> None:
        self.max_keys, self.max_entries = max_keys, max_entries
        self._keys: OrderedDict[bytes, list[Entry]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def get(self, key: bytes) -> list[Entry]:
        """The live entries ``key`` held at its last read ([] if none is remembered)."""
        now = time.time()
        return [e for e in self._keys.get(key, ()) if e.expiration > now]

    def remember(self, key: bytes, entries: list[Entry]) -> None:
        self._count -= len(self._keys.pop(key, ()))
        if not entries or len(entries) > self.max_entries:
            return
        self._keys[key] = entries
        self._count += len(entries)
        while len(self._keys) > self.max_keys or self._count > self.max_entries:
            self._count -= len(self._keys.popitem(last=False)[1])
