"""A Kademlia value store that merges Legion bundles instead of replacing them."""

from __future__ import annotations

import logging

from libp2p.kad_dht.common import format_time_rfc3339
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.value_store import ValueStore
from libp2p.records.record import make_signed_put_record

from dht.records import KEY_PREFIX, Entry, RecordError, decode_bundle_lenient, fit_bundle, merge

log = logging.getLogger(__name__)
_PREFIX = KEY_PREFIX.encode()


def _entries(key: bytes, record: Record | None) -> tuple[list[Entry], int]:
    """Valid entries of a stored record and how many entries it held in all."""
    if record is None:
        return [], 0
    try:
        entries, problems = decode_bundle_lenient(key.decode(), record.value)
    except (RecordError, UnicodeDecodeError):
        return [], 1
    return entries, len(entries) + len(problems)


class MergingValueStore(ValueStore):
    """Stored ``/legion/`` bundles are merged per subkey on every put and pruned of expired entries
    on every read. The merged bundle is re-signed by this node as the outer record's author (the
    entries inside keep their writers' signatures, which is what readers check)."""

    def put_record(self, key: bytes, record: Record) -> None:
        if not key.startswith(_PREFIX):
            super().put_record(key, record)
            return
        stored = self.store.get(key)
        existing, _ = _entries(key, stored[0] if stored else None)
        incoming, _ = _entries(key, record)
        if incoming:
            self._store_entries(key, merge(existing, incoming))

    def get(self, key: bytes) -> Record | None:
        record = super().get(key)
        if record is None or not key.startswith(_PREFIX):
            return record
        entries, total = _entries(key, record)
        live = merge(entries)
        if not live:
            self.remove(key)
            return None
        return record if len(live) == total else self._store_entries(key, live)

    def _store_entries(self, key: bytes, entries: dict[str, Entry]) -> Record:
        record = make_signed_put_record(key, fit_bundle(entries), self.host.get_private_key())
        record.timeReceived = format_time_rfc3339()
        super().put_record(key, record)
        return record
