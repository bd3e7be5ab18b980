"""A Kademlia value store that merges Legion bundles instead of replacing them."""

from __future__ import annotations

from libp2p.kad_dht.common import format_time_rfc3339
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.value_store import ValueStore

from dht.records import KEY_PREFIX, Entry, RecordError, decode_bundle_lenient, fit_bundle, merge

_PREFIX = KEY_PREFIX.encode()


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
    on every read. The merged record carries no outer signature (Kademlia's is optional): each entry
    inside keeps its writer's signature, which is what every reader checks, so re-signing every
    merge would only cost a signature here and a verification at every reader."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._entry_counts: dict[bytes, int] = {}

    def put_record(self, key: bytes, record: Record) -> None:
        if not key.startswith(_PREFIX):
            super().put_record(key, record)
            return
        stored = self.store.get(key)
        incoming = _entries(key, record)
        if incoming:
            self._store_entries(key, merge(_entries(key, stored[0] if stored else None), incoming))

    def get(self, key: bytes) -> Record | None:
        record = super().get(key)
        if record is None or not key.startswith(_PREFIX):
            return record
        live = merge(_entries(key, record))
        if not live:
            self.remove(key)
            self._entry_counts.pop(key, None)
            return None
        return record if len(live) == self._entry_counts.get(key) else self._store_entries(key, live)

    def _store_entries(self, key: bytes, entries: dict[str, Entry]) -> Record:
        record = Record(key=key, value=fit_bundle(entries))
        record.timeReceived = format_time_rfc3339()
        super().put_record(key, record)
        self._entry_counts[key] = len(entries)
        return record
