"""Keys every peer of a swarm writes one entry under, split into buckets as the swarm grows.

Up to ``2 * BUCKET_ENTRIES`` writers such a key is one DHT key. Beyond, it is split into
``2^level`` bucket keys (``KEY/level.prefix``) of ``BUCKET_ENTRIES`` to twice that many entries:
a peer writes its entry in the bucket its id hashes to and reads that bucket only, with the keys
one level up and down, where peers whose estimate of the swarm differs by a factor of two write.
So the bytes a read moves, and what a key's holders store and serve, stay bounded however large
the swarm. The entries a peer reads of its own bucket, times the number of buckets, estimate how
many peers write the key (``BucketRead.estimate``), which also gives the level to write at.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, TypeVar

import trio

from dht.records import Entry, merge

T = TypeVar("T")

log = logging.getLogger(__name__)

BUCKET_ENTRIES = 32  # a bucket holds this many entries to twice as many
MAX_LEVEL = 12  # 4,096 buckets: 131,072 to 262,144 writers
LEVEL_READ_BEATS = 6  # a writer that reads its bucket only to follow its level does so every this many heartbeats


class EntryReader(Protocol):
    async def get(self, key: str) -> dict[str, Entry]: ...


def bucket_level(estimate: int) -> int:
    """The level a key of ``estimate`` writers is split at: ``2^level`` buckets of
    ``BUCKET_ENTRIES`` to ``2 * BUCKET_ENTRIES`` entries (one key below that)."""
    return min(MAX_LEVEL, max(0, (estimate // BUCKET_ENTRIES).bit_length() - 1))


def bucket_prefix(peer_id: str, level: int) -> int:
    """The bucket of ``peer_id`` at ``level``: the first ``level`` bits of a hash of its id, so
    that a bucket's two halves one level down are buckets too."""
    return _hash64(peer_id) >> (64 - level) if level else 0


@functools.lru_cache(maxsize=1 << 16)  # a reader places every entry it reads, every read
def _hash64(peer_id: str) -> int:
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:8], "big")


def bucket_key(key: str, level: int, prefix: int) -> str:
    return key if level == 0 else f"{key}/{level}.{prefix}"


def own_bucket_key(key: str, peer_id: str, level: int) -> str:
    """Where ``peer_id`` writes its entry of ``key`` at ``level``."""
    return bucket_key(key, level, bucket_prefix(peer_id, level))


@dataclass(frozen=True)
class BucketRead(Generic[T]):
    entries: list[T]  # the reader's bucket (every entry, while the key is not split)
    estimate: int  # writers of the whole key, from the reader's bucket
    level: int  # the level to write and read at next


async def read_buckets(dht: EntryReader, key: str, parse: Callable[[str, Any], T], what: str, *, me: str = "",
                       level: int | None = None, probe_below: bool = False) -> BucketRead[T]:
    """The entries of ``me``'s bucket of ``key`` (a random bucket without ``me``) at ``level``, the
    keys one level up and down included, as ``parse(subkey, value)`` (a ``ValueError`` drops the
    entry, logged as an ignored ``what``). At level 0 the keys below are read only once the
    unsplit key holds a bucket's worth (or with ``probe_below``): peers that moved down leave
    their entries there for a lifetime, so a reader that reads every lifetime follows them;
    one that reads more rarely probes. Without ``level`` (a peer joining, or ``status``): the
    unsplit key, and where that is empty or holds a bucket's worth, ``me``'s bucket at every
    level (a peer finds its level before it writes, so in a large swarm the unsplit key is empty)."""
    me = me or secrets.token_hex(16)
    if level is None:
        read = await _read_keys(dht, key, me, [0])
        if sum(map(len, read.values())) >= BUCKET_ENTRIES or not any(read.values()):
            read.update(await _read_keys(dht, key, me, list(range(1, MAX_LEVEL + 1))))
        # the peers write at the level whose key holds the most entries
        counted = max(range(MAX_LEVEL + 1), key=lambda lv: (len(read.get(own_bucket_key(key, me, lv), {})), -lv))
    else:
        read = await _read_keys(dht, key, me, list(range(max(0, level - 1), level + 1)))
        if level > 0 or probe_below or sum(map(len, read.values())) >= BUCKET_ENTRIES:
            read.update(await _read_keys(dht, key, me, [level + 1], both_halves=True))
        counted = level
    newest = merge(*(entries.values() for entries in read.values()))  # a peer that moved levels: its newest
    # every writer of this bucket at the level counted was read, whichever of the levels it writes at
    prefix = bucket_prefix(me, counted)
    estimate = sum(1 for peer in newest if bucket_prefix(peer, counted) == prefix) << counted
    new_level = bucket_level(estimate)
    if level is not None:  # one step a read: the next read covers the level written at
        new_level = min(level + 1, max(level - 1, new_level))
    return BucketRead(parse_entries(newest, parse, what), estimate, new_level)


async def read_every_bucket(dht: EntryReader, key: str, parse: Callable[[str, Any], T], what: str) -> BucketRead[T]:
    """Every entry of ``key``, bucket by bucket (the levels next to the one found included): an
    operator's whole view, ``2^level`` reads and more, never a peer's heartbeat."""
    found = await read_buckets(dht, key, lambda subkey, value: subkey, what)
    keys = {bucket_key(key, level, prefix) for level in range(max(0, found.level - 1), found.level + 2)
            for prefix in range(1 << level)}
    read: dict[str, dict[str, Entry]] = {}

    async def read_key(one: str) -> None:
        read[one] = await dht.get(one)

    async with trio.open_nursery() as nursery:
        for one in sorted(keys):
            nursery.start_soon(read_key, one)
    newest = merge(*(entries.values() for entries in read.values()))
    return BucketRead(parse_entries(newest, parse, what), len(newest), found.level)


def parse_entries(entries: dict[str, Entry], parse: Callable[[str, Any], T], what: str) -> list[T]:
    """``parse(subkey, value)`` of each entry; one that raises ``ValueError`` is dropped and logged
    as an ignored ``what``."""
    parsed = []
    for subkey, entry in entries.items():
        try:
            parsed.append(parse(subkey, entry.value))
        except ValueError as exc:
            log.warning("ignoring %s of %s: %s", what, subkey, exc)
    return parsed


async def _read_keys(dht: EntryReader, key: str, me: str, levels: list[int],
                     both_halves: bool = False) -> dict[str, dict[str, Entry]]:
    """The entries under ``me``'s bucket key at each of ``levels`` (and its sibling's, with
    ``both_halves``), read at once."""
    keys = set()
    for level in levels:
        prefix = bucket_prefix(me, level)
        keys.add(bucket_key(key, level, prefix))
        if both_halves and level > 0:
            keys.add(bucket_key(key, level, prefix ^ 1))
    read: dict[str, dict[str, Entry]] = {}

    async def read_key(one: str) -> None:
        read[one] = await dht.get(one)

    async with trio.open_nursery() as nursery:
        for one in sorted(keys):
            nursery.start_soon(read_key, one)
    return read
