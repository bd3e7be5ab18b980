"""A Kademlia value store that merges Legion bundles instead of replacing them, within caps."""

from __future__ import annotations

import logging
import time

from libp2p.kad_dht.common import format_time_rfc3339
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.value_store import ValueStore

from dht.records import KEY_PREFIX, Entry, RecordError, decode_bundle_lenient, fit_bundle, merge

log = logging.getLogger(__name__)

_PREFIX = KEY_PREFIX.encode()
MAX_KEYS = 1024  # /legion/ keys held at once; a new key beyond this is refused, not stored over another
MAX_BYTES = 64 << 20  # their bundles' bytes together
MAX_KEYS_PER_WRITER = 32  # keys one writer (an entry's subkey) may have entries under


def _entries(key: bytes, record: Record | None) -> list[Entry]:
    """The valid, unexpired entries of a record."""
    if record is None:
        return []
    try:
        return decode_bundle_lenient(key.decode(), record.value)[0]
    except (RecordError, UnicodeDecodeError):
        return []


class MergingValueStore(ValueStore):
    """Stored ``/legion/`` bundles are merged per subkey on every put and pruned of expired entries
    on every read. The entries of each key are kept decoded beside its encoded bundle, so a put
    decodes only the entries it brings (a peer's heartbeat: one), not the whole bundle again. The merged record carries no outer signature (Kademlia's is optional): each entry
    inside keeps its writer's signature, which is what every reader checks, so re-signing every
    merge would only cost a signature here and a verification at every reader.

    What others can make this node hold is capped: ``MAX_KEYS`` keys and ``MAX_BYTES`` in all
    (new keys are refused when full; the keys held are the ones peers refresh), and a writer's
    entries count under at most ``MAX_KEYS_PER_WRITER`` keys (its entries under further keys are
    dropped). py-libp2p's own store takes 50,000 keys of any size."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._writers: dict[bytes, frozenset[str]] = {}  # key -> subkeys of its stored entries
        self._keys_of: dict[str, dict[bytes, float]] = {}  # subkey -> keys holding one of its entries, and its expiry
        self._sizes: dict[bytes, int] = {}  # key -> bytes of its stored bundle
        self._expiry: dict[bytes, float] = {}  # key -> when its last entry expires
        self._entries: dict[bytes, list[Entry]] = {}  # key -> the entries its stored bundle holds

    def put_record(self, key: bytes, record: Record) -> None:
        if not key.startswith(_PREFIX):
            super().put_record(key, record)
            return
        stored = self.store.get(key)
        incoming = [e for e in _entries(key, record) if self._writer_may_store(e.subkey, key)]
        if not incoming:
            return
        if stored is None and not self._room_for_a_key():
            log.info("refused a new DHT key: %d keys / %d bytes held", len(self._sizes), sum(self._sizes.values()))
            return
        self._store_entries(key, merge(self._entries.get(key, []) if stored else [], incoming))

    def get(self, key: bytes) -> Record | None:
        record = super().get(key)
        if record is None or not key.startswith(_PREFIX):
            return record
        live = merge(self._entries.get(key, []))
        if not live:
            self.remove(key)
            return None
        return record if frozenset(live) == self._writers.get(key) else self._store_entries(key, live)

    def remove(self, key: bytes) -> bool:
        self._forget(key)
        return super().remove(key)

    def _writer_may_store(self, subkey: str, key: bytes) -> bool:
        """Whether ``subkey``'s writer may have an entry under ``key``: its entries that expired
        count no more, though nobody read their keys since (a peer writes new matchmaking keys
        every round, and old rounds' keys are never read again: counted, they filled its 32 in a
        few minutes and every later entry of it was dropped)."""
        held = self._keys_of.get(subkey, {})
        if key in held or len(held) < MAX_KEYS_PER_WRITER:
            return True
        now = time.time()
        for expired in [k for k, expiration in held.items() if expiration <= now]:
            del held[expired]
        if len(held) < MAX_KEYS_PER_WRITER:
            return True
        log.info("dropped an entry under %s: its writer has live entries under %d keys here",
                 key.decode(errors="replace"), len(held))
        return False

    def _room_for_a_key(self) -> bool:
        if len(self._sizes) < MAX_KEYS and sum(self._sizes.values()) < MAX_BYTES:
            return True
        now = time.time()
        for key in [k for k, expiry in self._expiry.items() if expiry <= now]:
            self.remove(key)
        return len(self._sizes) < MAX_KEYS and sum(self._sizes.values()) < MAX_BYTES

    def _forget(self, key: bytes) -> None:
        for subkey in self._writers.pop(key, ()):
            keys = self._keys_of.get(subkey)
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del self._keys_of[subkey]
        self._sizes.pop(key, None)
        self._expiry.pop(key, None)
        self._entries.pop(key, None)

    def _store_entries(self, key: bytes, entries: dict[str, Entry]) -> Record:
        value, kept = fit_bundle(entries)
        record = Record(key=key, value=value)
        record.timeReceived = format_time_rfc3339()
        super().put_record(key, record)
        self._forget(key)
        self._entries[key] = kept
        self._writers[key] = frozenset(e.subkey for e in kept)
        for entry in kept:
            self._keys_of.setdefault(entry.subkey, {})[key] = entry.expiration
        self._sizes[key] = len(record.value)
        self._expiry[key] = max((e.expiration for e in kept), default=0.0)
        return record
