"""The validator every Legion DHT node registers for the ``legion`` namespace."""

from __future__ import annotations

import logging

from libp2p.records.validator import Validator

from dht.records import RecordError, decode_bundle_lenient, decode_bundle_strict, merge

log = logging.getLogger(__name__)


class LegionValidator(Validator):
    """Rejects unsigned, forged, expired, oversized and malformed bundles.

    ``select`` prefers the candidate that brings any entry newer than the others hold; the merging
    value store then keeps the union, so "selecting" a bundle never discards other peers' entries.
    """

    def validate(self, key: str, value: bytes) -> None:
        try:
            decode_bundle_strict(key, value)
        except RecordError as exc:
            log.info("rejected record for %s: %s", key[:80], exc)
            raise

    def select(self, key: str, values: list[bytes]) -> int:
        """The last candidate holding an entry fresher than all the others hold, else 0.

        For a PUT the DHT asks ``select(key, [stored, offered])``: the offer is taken whenever it
        brings anything new, and the merging store then keeps the union of both."""
        decoded = []
        for value in values:
            try:
                decoded.append(merge(decode_bundle_lenient(key, value)[0]))
            except RecordError:
                decoded.append({})
        for index in reversed(range(len(decoded))):
            others = merge(*(d.values() for i, d in enumerate(decoded) if i != index))
            if any(sub not in others or e.newer_than(others[sub]) for sub, e in decoded[index].items()):
                return index
        return 0
