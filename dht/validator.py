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
        decoded = []
        for value in values:
            try:
                decoded.append(merge(decode_bundle_lenient(key, value)[0]))
            except RecordError:
                decoded.append({})
        best, best_score = 0, None
        for index, entries in enumerate(decoded):
            others = merge(*(d.values() for i, d in enumerate(decoded) if i != index))
            fresher = sum(1 for sub, e in entries.items() if sub not in others or e.newer_than(others[sub]))
            score = (fresher, len(entries))
            if best_score is None or score > best_score:
                best, best_score = index, score
        return best
