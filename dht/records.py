"""Signed entries and the bundles that hold them.

A DHT key under ``/legion/`` holds a *bundle*: a msgpack list of entries, one per subkey. Every entry
is written and signed by one peer, its subkey is that peer's id, and it carries its own timestamp and
expiration. Bundles from different peers merge entry by entry, newest timestamp wins, so one key can
hold e.g. the whole member list of a swarm while each member only ever writes its own entry.

Only Ed25519 peer ids are accepted: their public key is inlined in the id, so an entry needs no
separate key field, a forged subkey cannot verify, and every check costs one cheap Ed25519
verification (an RSA key with a huge exponent could cost a reader ~57 ms per entry).

Limits keep what one writer can make a node hold small: an entry lives at most ``MAX_TTL`` (every
Legion entry is refreshed each heartbeat), each kind of key caps its entries' size
(``entry_limit``), and a bundle over its size cap loses its largest entries first, so no writer can
push others' entries out by writing a big one.

A reader that read a key before asks its replicas for what it lacks (``encode_read``), and a
replica answers with a *delta* (``read_answer``). The first time, the reader names the entries it
holds (a short digest of each entry's signature), and the replica names back those it holds too
and sends its other entries in full. Every answer carries a token, and the replica remembers, per
reader and key, what it told with it (``dht.told``): a reread then names only the token, and the
replica answers with what it dropped and what it gained since. A seeker rereads its matchmaking
key every second or two; a replica's answer was the whole bundle each time, then (until
2026-12-07) every entry named both ways. The request rides in the GET_VALUE request's otherwise
unused record, so a node of an earlier version ignores it and answers with its bundle;
``decode_answer`` reads either.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import msgpack
from libp2p.crypto.keys import KeyPair, KeyType, PublicKey
from libp2p.peer.id import ID

NAMESPACE = "legion"
KEY_PREFIX = f"/{NAMESPACE}/"
MAX_KEY_BYTES = 256
MAX_ENTRY_BYTES = 64 * 1024
MAX_BUNDLE_BYTES = 512 * 1024
MAX_TTL = 600.0  # Legion's entries live a few heartbeats (<= 25 s) and a matchmaking budget
# The largest entry each kind of key takes (the path segment after the swarm's name); others MAX_ENTRY_BYTES
KIND_ENTRY_BYTES = {"members": 8192, "run": 8192, "runs": 16384, "checkpoints": 4096, "mm": 8192, "shards": 2048}
CLOCK_SKEW = 30.0
DIGEST_BYTES = 8  # of an entry's signature (Ed25519: nobody can make another entry's digest match one it reads)
MAX_KNOWN = 2048  # digests one read may name (16 KiB): a reader holding more names the newest
TOKEN_BYTES = 8  # a replica's mark of what it told a reader (``read_answer``)
# a read's request and a replica's answer (a bundle, a msgpack list, never begins so); until
# 2026-12-07 (v1) a reread named every entry its reader held, 8 bytes each, both ways, every time
_READ_TAG = b"legion-read-v2:"
_SIGNATURE_DOMAIN = b"legion-record-v1"


class RecordError(ValueError):
    """A record or entry that must not be stored or believed."""


@dataclass(frozen=True)
class Entry:
    """One peer's signed value under a key. ``value`` is ``None`` for a withdrawn entry."""

    subkey: str
    value_bytes: bytes
    timestamp: float
    expiration: float
    signature: bytes

    @property
    def value(self) -> Any:
        return msgpack.unpackb(self.value_bytes, raw=False, strict_map_key=False)

    @property
    def withdrawn(self) -> bool:
        return self.value_bytes == _PACKED_NONE

    def newer_than(self, other: "Entry") -> bool:
        return (self.timestamp, self.expiration) > (other.timestamp, other.expiration)

    @functools.cached_property
    def _subkey_bytes(self) -> bytes:  # a store re-encodes its bundle on every put: decode the id once
        return ID.from_base58(self.subkey).to_bytes()

    def to_wire(self) -> list:
        return [self._subkey_bytes, self.value_bytes, self.timestamp, self.expiration, self.signature]


_PACKED_NONE = msgpack.packb(None)


def check_key(key: str) -> None:
    if not key.startswith(KEY_PREFIX) or len(key.encode()) > MAX_KEY_BYTES or len(key) <= len(KEY_PREFIX):
        raise RecordError(f"key {key[:80]!r} is not a /{NAMESPACE}/ key of at most {MAX_KEY_BYTES} bytes")


def entry_limit(key: str) -> int:
    """The largest entry (in wire bytes) that ``key``'s kind takes."""
    parts = key.split("/")  # "", "legion", swarm, kind, ...
    return KIND_ENTRY_BYTES.get(parts[3], MAX_ENTRY_BYTES) if len(parts) > 3 else MAX_ENTRY_BYTES


def ed25519_key(peer_id_bytes: bytes) -> PublicKey:
    """The Ed25519 public key inlined in a peer id; ``RecordError`` for anything else (another key
    type, a hashed key, bytes that are no peer id)."""
    try:
        public_key = ID(peer_id_bytes).extract_public_key()
    except Exception as exc:  # malformed multihash or key protobuf
        raise RecordError(f"not a peer id: {type(exc).__name__}: {exc}") from exc
    if public_key is None or public_key.get_type() != KeyType.Ed25519:
        raise RecordError("not an Ed25519 peer id with an inlined key")
    return public_key


def _signed_payload(key: str, subkey_bytes: bytes, value_bytes: bytes, timestamp: float,
                    expiration: float) -> bytes:
    return msgpack.packb([_SIGNATURE_DOMAIN, key, subkey_bytes, value_bytes, timestamp, expiration])


def sign_entry(key: str, key_pair: KeyPair, value: Any, ttl: float, now: float | None = None) -> Entry:
    """Make an entry for ``key`` holding ``value`` (any msgpack-able object), valid for ``ttl`` seconds."""
    check_key(key)
    if not 0 < ttl <= MAX_TTL:
        raise RecordError(f"ttl {ttl} outside (0, {MAX_TTL}]")
    now = time.time() if now is None else now
    value_bytes = msgpack.packb(value, use_bin_type=True)
    peer_id = ID.from_pubkey(key_pair.public_key)
    expiration = now + ttl
    signature = key_pair.private_key.sign(
        _signed_payload(key, peer_id.to_bytes(), value_bytes, now, expiration))
    entry = Entry(peer_id.to_base58(), value_bytes, now, expiration, signature)
    if len(msgpack.packb(entry.to_wire())) > entry_limit(key):
        raise RecordError(f"entry of {len(value_bytes)} value bytes exceeds {entry_limit(key)} bytes for {key}")
    return entry


class ExpiredEntry(RecordError):
    """An entry past its expiration: routine, as entries expire in transit."""


# Entries already verified, keyed by their complete wire content: every read and every merge
# re-decodes the same bundles, and a signature check costs far more than this lookup.
_verified: dict[tuple, Entry] = {}
_VERIFIED_MAX = 1 << 15


def verify_entry(key: str, wire: Any, now: float | None = None) -> Entry:
    """Check one wire entry completely (shape, size, signature, expiry) and return it."""
    if not (isinstance(wire, list) and len(wire) == 5):
        raise RecordError("entry is not a list of 5 fields")
    subkey_bytes, value_bytes, timestamp, expiration, signature = wire
    if not (isinstance(subkey_bytes, bytes) and isinstance(value_bytes, bytes)
            and isinstance(signature, bytes)):
        raise RecordError("entry fields have wrong types")
    if not all(isinstance(t, (int, float)) and math.isfinite(t) for t in (timestamp, expiration)):
        raise RecordError("entry times are not finite numbers")
    if len(subkey_bytes) + len(value_bytes) + len(signature) > entry_limit(key):
        raise RecordError(f"entry exceeds the {entry_limit(key)} bytes allowed under {key[:80]}")
    now = time.time() if now is None else now
    if expiration <= now:
        raise ExpiredEntry(f"entry expired {now - expiration:.1f}s ago")
    if timestamp > now + CLOCK_SKEW or expiration > now + MAX_TTL + CLOCK_SKEW or expiration < timestamp:
        raise RecordError("entry times are in the future or inconsistent")
    cache_key = (key, subkey_bytes, value_bytes, timestamp, expiration, signature)
    entry = _verified.get(cache_key)
    if entry is None:
        entry = _verify_signed_entry(key, subkey_bytes, value_bytes, timestamp, expiration, signature)
        if len(_verified) >= _VERIFIED_MAX:
            _verified.clear()
        _verified[cache_key] = entry
    return entry


def _verify_signed_entry(key: str, subkey_bytes: bytes, value_bytes: bytes, timestamp: float,
                         expiration: float, signature: bytes) -> Entry:
    try:
        public_key = ed25519_key(subkey_bytes)
    except RecordError as exc:
        raise RecordError(f"subkey: {exc}") from exc
    peer_id = ID(subkey_bytes)
    try:
        valid = public_key.verify(
            _signed_payload(key, subkey_bytes, value_bytes, timestamp, expiration), signature)
    except Exception:
        valid = False
    if not valid:
        raise RecordError(f"signature does not match subkey {peer_id.to_base58()}")
    try:
        msgpack.unpackb(value_bytes, raw=False, strict_map_key=False)
    except Exception as exc:
        raise RecordError(f"value is not msgpack: {exc}") from exc
    return Entry(peer_id.to_base58(), value_bytes, float(timestamp), float(expiration), signature)


def encode_bundle(entries: Iterable[Entry]) -> bytes:
    return msgpack.packb([entry.to_wire() for entry in entries], use_bin_type=True)


def _unpack_bundle(data: bytes) -> list:
    if len(data) > MAX_BUNDLE_BYTES:
        raise RecordError(f"record of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}")
    try:
        wire = msgpack.unpackb(data, raw=False, max_bin_len=MAX_ENTRY_BYTES,
                               max_array_len=MAX_BUNDLE_BYTES // 64, max_map_len=0, max_str_len=0)
    except Exception as exc:
        raise RecordError(f"record is not a msgpack bundle: {exc}") from exc
    if not isinstance(wire, list) or not wire:
        raise RecordError("record is not a non-empty list of entries")
    return wire


def decode_bundle_strict(key: str, data: bytes, now: float | None = None) -> list[Entry]:
    """Every entry must be valid: the rule for records offered to this node for storage."""
    check_key(key)
    return [verify_entry(key, wire, now) for wire in _unpack_bundle(data)]


def decode_bundle_lenient(key: str, data: bytes, now: float | None = None) -> tuple[list[Entry], list[str]]:
    """Keep the valid entries of a bundle read from the network; return the reasons for rejecting
    the others (expired entries are dropped without a reason: they are routine)."""
    check_key(key)
    return _verify_each(key, _unpack_bundle(data), now)


def _verify_each(key: str, wires: list, now: float | None) -> tuple[list[Entry], list[str]]:
    entries, problems = [], []
    for wire in wires:
        try:
            entries.append(verify_entry(key, wire, now))
        except ExpiredEntry:
            continue
        except RecordError as exc:
            problems.append(str(exc))
    return entries, problems


def merge(*groups: Iterable[Entry], now: float | None = None) -> dict[str, Entry]:
    """Newest entry per subkey across all groups, expired entries dropped."""
    now = time.time() if now is None else now
    merged: dict[str, Entry] = {}
    for group in groups:
        for entry in group:
            if entry.expiration <= now:
                continue
            current = merged.get(entry.subkey)
            if current is None or entry.newer_than(current):
                merged[entry.subkey] = entry
    return merged


def entry_bytes(entry: Entry) -> int:
    """An entry's size on the wire, near enough (fields plus msgpack framing)."""
    return len(entry.subkey) + len(entry.value_bytes) + len(entry.signature) + 32


def fit_bundle(entries: dict[str, Entry]) -> tuple[bytes, list[Entry]]:
    """Encode the merged entries, and return those kept: if the bundle would be too large, the
    largest entries are left out (each writer has one entry per key, so a writer of small entries
    is never pushed out by one of large entries)."""
    kept, size = [], 8
    for entry in sorted(entries.values(), key=lambda e: (entry_bytes(e), e.subkey)):
        size += entry_bytes(entry)
        if size > MAX_BUNDLE_BYTES:
            break
        kept.append(entry)
    data = encode_bundle(kept)
    while len(data) > MAX_BUNDLE_BYTES:  # the estimate fell short: drop from the large end
        kept = kept[: len(kept) - max(1, len(kept) // 100)]
        data = encode_bundle(kept)
    return data, kept


def digest(entry: Entry) -> bytes:
    return entry.signature[:DIGEST_BYTES]


def encode_read(token: bytes, known: Iterable[Entry]) -> bytes:
    """A read's request to a replica: the ``token`` of that replica's last answer to this reader
    (b"" for none), else the digests of the entries the reader holds (the newest ``MAX_KNOWN``)."""
    newest = [] if token else sorted(known, key=lambda e: e.timestamp, reverse=True)[:MAX_KNOWN]
    return _READ_TAG + msgpack.packb([token, b"".join(map(digest, newest))], use_bin_type=True)


def decode_read(data: bytes) -> tuple[bytes, frozenset[bytes]] | None:
    """The token and digests ``encode_read`` wrote; None where ``data`` is not such a request (a
    request without one, or a malformed one: answered in full)."""
    if not data.startswith(_READ_TAG) or len(data) > len(_READ_TAG) + 16 + MAX_KNOWN * DIGEST_BYTES:
        return None
    try:
        token, known = msgpack.unpackb(data[len(_READ_TAG):], raw=False, max_map_len=0, max_str_len=0,
                                       max_array_len=2)
    except Exception:
        return None
    if not (isinstance(token, bytes) and len(token) in (0, TOKEN_BYTES) and isinstance(known, bytes)
            and len(known) % DIGEST_BYTES == 0 and len(known) <= MAX_KNOWN * DIGEST_BYTES):
        return None
    return token, _split_digests(known)


def _split_digests(digests: bytes) -> frozenset[bytes]:
    return frozenset(digests[i:i + DIGEST_BYTES] for i in range(0, len(digests), DIGEST_BYTES))


def read_answer(bundle: bytes, known: frozenset[bytes], told: frozenset[bytes] | None,
                token: bytes) -> tuple[bytes, frozenset[bytes]]:
    """A replica's answer to a read, marked with ``token``, and the digests of every entry of
    ``bundle`` (what it has now told the reader). Where the reader's token matched, ``told``
    (what the replica told it then): the digests of those entries it no longer holds, and its
    entries not among them. Else the digests of those ``known`` names that it holds too, and its
    other entries. A bundle that is not a list of entries passes unchanged (a node stores only
    bundles it decoded: not expected)."""
    try:
        wires = _unpack_bundle(bundle)
    except RecordError:
        return bundle, frozenset()
    held, others, everything = set(), [], set()
    for wire in wires:
        signed = isinstance(wire, list) and len(wire) == 5 and isinstance(wire[4], bytes)
        mark = wire[4][:DIGEST_BYTES] if signed else None
        if mark is not None:
            everything.add(mark)
        if mark is not None and mark in (known if told is None else told):
            held.add(mark)
        else:
            others.append(wire)
    named = held if told is None else told - everything
    return _READ_TAG + msgpack.packb([token, told is not None, b"".join(sorted(named)), others],
                                     use_bin_type=True), frozenset(everything)


@dataclass(frozen=True)
class Answer:
    """A replica's answer to a read (``decode_answer``)."""

    entries: list[Entry]  # the valid entries it sent
    named: frozenset[bytes]  # digests: of the reader's entries it holds too, or ``since``, of those it dropped
    since: bool  # an answer to the reader's token: ``named`` are what it no longer holds of what it told
    token: bytes  # its mark for the reader's next request (b"": none, a node of an earlier version)
    problems: list[str]  # why the others were rejected


def decode_answer(key: str, data: bytes, now: float | None = None) -> Answer:
    """A replica's answer to a read: a bundle (a node of an earlier version) or a ``read_answer``."""
    if not data.startswith(_READ_TAG):
        entries, problems = decode_bundle_lenient(key, data, now)
        return Answer(entries, frozenset(), False, b"", problems)
    check_key(key)
    if len(data) > MAX_BUNDLE_BYTES + len(_READ_TAG):
        raise RecordError(f"answer of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}")
    try:
        token, since, named, wires = msgpack.unpackb(
            data[len(_READ_TAG):], raw=False, max_bin_len=MAX_ENTRY_BYTES,
            max_array_len=MAX_BUNDLE_BYTES // 64, max_map_len=0, max_str_len=0)
    except Exception as exc:
        raise RecordError(f"answer is not a msgpack read answer: {exc}") from exc
    if not (isinstance(token, bytes) and len(token) == TOKEN_BYTES and isinstance(since, bool)
            and isinstance(named, bytes) and len(named) % DIGEST_BYTES == 0 and isinstance(wires, list)):
        raise RecordError("answer is not a token, a flag, a list of digests and one of entries")
    entries, problems = _verify_each(key, wires, now)
    return Answer(entries, _split_digests(named), since, token, problems)
