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
LEVEL_READ_BEATS = 6  # reads (or heartbeats, for a writer that reads only to follow its level) between finding the level
FIND_LEVELS = 4  # levels above its own a reader finding its level looks at
# Replicas whose record a read of a split bucket key takes (more where one holds none). The
# unsplit key keeps the DHT's default: a small swarm's young entries may have reached only some
# replicas. A split key's bucket is re-read every few heartbeats, and a reader that misses an entry
# once still counts its peer (the trainer remembers the board for several lifetimes); each further
# replica read moved the whole bucket again: ~60 entries for every reader, every read.
SPLIT_READ_FANOUT = 1
# Heartbeats between a writer's refreshes of its entry once the key is split (the entry lives that
# many times longer). A DHT request costs ~3 KB on the wire whatever it carries (a libp2p stream
# each: ``bench/dht_request_cost.py``), so a peer's upkeep is counted in requests, and a large
# swarm's peers need not see each other's progress every heartbeat. hivemind refreshes its
# servers' records every 30 s.
SPLIT_REFRESH_BEATS = 6


class EntryReader(Protocol):
    async def get(self, key: str, *, probe: bool = False, fanout: int | None = None) -> dict[str, Entry]: ...


class EntryWriter(Protocol):
    async def store(self, key: str, value: Any, ttl: float) -> int: ...


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


class BucketPlace(Generic[T]):
    """One peer's place in a key every peer writes: the level its last read found (None before the
    first, which finds it), the writers that read estimated, and where it writes its own entry.
    Its entries are ``parse(subkey, value)``; one that raises ``ValueError`` is dropped and logged
    as an ignored ``what``."""

    def __init__(self, key: str, parse: Callable[[str, Any], T], what: str, me: str = "",
                 unsplit_refreshes_per_beat: int = 0) -> None:
        self.key, self.parse, self.what = key, parse, what
        # with it, the unsplit key's writers refresh their entries less often as they grow: about
        # this many refreshes a heartbeat in all (at most one a writer, at least one every
        # ``SPLIT_REFRESH_BEATS``), see ``refresh_beats``
        self.unsplit_refreshes_per_beat = unsplit_refreshes_per_beat
        self.me = me or secrets.token_hex(16)  # a reader that writes nothing reads a random bucket
        self.level: int | None = None
        self.estimate = 0
        # peers started together would otherwise all look at the levels above at the same reads
        self._turn = _hash64(self.me) % LEVEL_READ_BEATS
        self._adopted = False  # a level taken from another key since the last look (``adopt``)
        self._beats_since_write = 0
        self._written: tuple[str, Any] | None = None  # (key, value) of this peer's last write
        self._written_beats = 1  # the ``refresh_beats`` its lifetime was written for

    @property
    def own_key(self) -> str:
        """Where this peer writes its entry: its bucket at its level (the unsplit key before its first read)."""
        return own_bucket_key(self.key, self.me, self.level or 0)

    async def read(self, dht: EntryReader, *, find_level: bool | None = None) -> BucketRead[T]:
        """The entries of this peer's bucket (``read_buckets``), looking at the levels above every
        ``LEVEL_READ_BEATS`` reads unless ``find_level`` says otherwise."""
        if find_level is None:
            find_level = self._turn % LEVEL_READ_BEATS == 0
        self._turn += 1
        read = await read_buckets(dht, self.key, self.parse, self.what, me=self.me, level=self.level,
                                  find_level=find_level)
        self.level, self.estimate = read.level, read.estimate
        return read

    @property
    def refresh_beats(self) -> int:
        """Heartbeats between refreshes of this peer's entry: ``SPLIT_REFRESH_BEATS`` once the key
        is split; while it is not, one (a small swarm, whose peers watch each other closely), or
        with ``unsplit_refreshes_per_beat`` one for up to that many writers, more for more (64
        peers' member entries refreshed every heartbeat were a third of the DHT requests of 64 peers
        on one machine, ``bench/matchmaking_swarm.py``). The entry's lifetime is that many times a
        heartbeat's."""
        if self.level:
            return SPLIT_REFRESH_BEATS
        if not self.unsplit_refreshes_per_beat:
            return 1
        return max(1, min(SPLIT_REFRESH_BEATS, -(-self.estimate // self.unsplit_refreshes_per_beat)))

    def refresh_due(self, value: Any = None) -> bool:
        """Once a heartbeat: whether to write this peer's entry now, ``refresh_beats`` heartbeats
        after the last write (``write``; sooner where the last write's lifetime was shorter), or at
        once where its key (its level) or ``value`` changed since (None: the value is not compared)."""
        self._beats_since_write += 1
        due = min(self.refresh_beats, self._written_beats)
        return self._beats_since_write >= due or self._written != (self.own_key, value)

    async def write(self, dht: EntryWriter, value: Any, ttl: float, compared: Any = None) -> None:
        """Write this peer's entry ``value`` at its own key, living ``ttl`` (an entry's lifetime
        in a small swarm) times ``refresh_beats``. Once a node took it, the next ``refresh_due``
        counts from here and compares ``compared``; where none did, it is due at the next heartbeat."""
        key, beats = self.own_key, self.refresh_beats
        if await dht.store(key, value, ttl * beats):
            self.wrote(compared, key, beats)

    def wrote(self, compared: Any = None, key: str | None = None, beats: int | None = None) -> None:
        """Record a write of this peer's entry at ``key`` (its own key) with ``compared``, living
        ``beats`` heartbeats' lifetimes (``refresh_beats``)."""
        self._beats_since_write, self._written = 0, (key or self.own_key, compared)
        self._written_beats = beats or self.refresh_beats

    def adopt(self, level: int, estimate: int | None = None) -> None:
        """Take ``level`` (and the writers' ``estimate``) from a read of another key the same peers
        write (the run board's, for a trainer's member and holdings entries): same writers, same
        level, and this key's own reads to follow it are skipped while levels keep coming. They
        were a third of a peer's own DHT traffic (``bench/scale.py --only dht``)."""
        self.level, self._adopted = level, True
        if estimate is not None:
            self.estimate = estimate

    async def follow(self, dht: EntryReader) -> None:
        """Once a heartbeat, for a peer that writes the key but does not otherwise read it: a read
        before its first write and then every ``LEVEL_READ_BEATS`` heartbeats (unless a level was
        adopted meanwhile), looking at the levels above, keeps its entry at the level the swarm
        writes at."""
        if self.level is None or (self._turn % LEVEL_READ_BEATS == 0 and not self._adopted):
            await self.read(dht, find_level=True)
            return
        if self._turn % LEVEL_READ_BEATS == 0:
            self._adopted = False
        self._turn += 1


async def read_buckets(dht: EntryReader, key: str, parse: Callable[[str, Any], T], what: str, *, me: str = "",
                       level: int | None = None, find_level: bool = False) -> BucketRead[T]:
    """The entries of ``me``'s bucket of ``key`` (a random bucket without ``me``) at ``level``, the
    keys one level up and down included, as ``parse(subkey, value)`` (a ``ValueError`` drops the
    entry, logged as an ignored ``what``). At level 0 the keys below are read only once the
    unsplit key holds a bucket's worth: peers that moved down leave their entries there for a
    lifetime, and a reader that reads every lifetime follows them.

    Without ``level`` (a peer joining, ``status``) the level is found first: the unsplit key's, if
    it holds some entries but fewer than its writers move up at (``_split_at``: a joiner of 64
    peers, all writing the unsplit key, probed every level's key, 12 lookups each), else the one of
    ``me``'s bucket keys at every level that holds the most entries. With ``find_level`` (every
    ``LEVEL_READ_BEATS`` reads), the keys of the ``FIND_LEVELS`` levels above are looked at too: a
    peer that drifted below the level the swarm writes at (it moved down when its first reads showed
    few peers) sees almost nobody there, and would take them for the whole swarm."""
    me = me or secrets.token_hex(16)
    read: dict[str, dict[str, Entry]] = {}
    probed: list[int] = []
    if level is None:
        read, level = await _read_keys(dht, key, me, [0]), 0
        if not 0 < len(read[key]) < _split_at(0):
            probed = list(range(1, MAX_LEVEL + 1))
    elif find_level:
        probed = list(range(level + 1, min(MAX_LEVEL, level + FIND_LEVELS) + 1))
    if probed:
        level = await _busiest_level(dht, key, me, level, probed, read)
    newest = await _bucket_at(dht, key, me, level, read)
    if level > 0 and _in_bucket(me, level, newest) < BUCKET_ENTRIES // 4:
        # a bucket this thin at a split level: this peer is not where the swarm writes (it moved
        # while the others moved the other way): every level is probed
        level = await _busiest_level(dht, key, me, level, [lv for lv in range(MAX_LEVEL + 1) if lv != level], read)
        newest = await _bucket_at(dht, key, me, level, read)
    estimate = _in_bucket(me, level, newest) << level
    return BucketRead(parse_entries(newest, parse, what), estimate, _next_level(level, estimate))


async def _busiest_level(dht: EntryReader, key: str, me: str, level: int, probed: list[int],
                         read: dict[str, dict[str, Entry]]) -> int:
    """Of ``level`` and ``probed``, the level whose key of ``me``'s bucket holds the most entries
    (the probes' answers go into ``read``)."""
    read.update(await _read_keys(dht, key, me, probed, probe=True, known=read))  # most are empty: probes
    return max([level, *probed], key=lambda lv: (len(read.get(own_bucket_key(key, me, lv), {})), -lv))


async def _bucket_at(dht: EntryReader, key: str, me: str, level: int,
                     read: dict[str, dict[str, Entry]]) -> dict[str, Entry]:
    """The newest entry of each writer of ``me``'s bucket at ``level`` and the keys one level up
    and down (read into ``read``, where not read already). The keys up and down hold the entries
    of peers between levels, few or none: they are probed (one replica asked, more only if it
    holds some), where a read of an empty key asks every replica."""
    around = _bucket_keys(key, me, [level - 1] if level > 0 else []) | _bucket_keys(key, me, [level + 1], both_halves=True)
    wanted = _bucket_keys(key, me, [level]) | around
    if level == 0:  # the keys below only once the unsplit key holds a bucket's worth
        read.update(await _read_keys(dht, key, me, [0], known=read))
        wanted = around if sum(map(len, read.values())) >= BUCKET_ENTRIES else set()
    read.update(await _get_all(dht, key, wanted - read.keys(), probed=around))
    return merge(*(entries.values() for entries in read.values()))  # a peer that moved levels: its newest


def _in_bucket(me: str, level: int, entries: dict[str, Entry]) -> int:
    """Writers of ``entries`` in ``me``'s bucket at ``level`` (every one of them was read, at
    whichever of the levels next to it they write)."""
    prefix = bucket_prefix(me, level)
    return sum(1 for peer in entries if bucket_prefix(peer, level) == prefix)


def _split_at(level: int) -> int:
    """The writers' estimate from which they move from ``level`` to the next: a quarter past the
    level's range."""
    return (BUCKET_ENTRIES << (level + 1)) * 5 // 4


def _next_level(level: int, estimate: int) -> int:
    """The level to write at next: a step toward ``bucket_level(estimate)`` once the estimate is
    a quarter past the edge of this level's range (a bucket's count is noisy: peers near an edge
    would go back and forth every read)."""
    target = bucket_level(estimate)
    if target > level and estimate < _split_at(level):
        target = level
    if target < level and estimate >= (BUCKET_ENTRIES << level) * 3 // 4:
        target = level
    return min(level + 1, max(level - 1, target))


async def read_every_bucket(dht: EntryReader, key: str, parse: Callable[[str, Any], T], what: str) -> BucketRead[T]:
    """Every entry of ``key``, bucket by bucket (the levels next to the one found included): an
    operator's whole view, ``2^level`` reads and more, never a peer's heartbeat."""
    found = await read_buckets(dht, key, lambda subkey, value: subkey, what)
    read = await _get_all(dht, key, {bucket_key(key, level, prefix) for level in range(max(0, found.level - 1), found.level + 2)
                                for prefix in range(1 << level)})
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


async def _read_keys(dht: EntryReader, key: str, me: str, levels: list[int], both_halves: bool = False,
                     known: dict[str, dict[str, Entry]] | None = None,
                     probe: bool = False) -> dict[str, dict[str, Entry]]:
    """The entries under ``me``'s bucket key at each of ``levels`` (and its sibling's, with
    ``both_halves``), read at once; keys in ``known`` are not read again."""
    keys = _bucket_keys(key, me, levels, both_halves) - set(known or ())
    return await _get_all(dht, key, keys, probed=keys if probe else set())


def _bucket_keys(key: str, me: str, levels: list[int], both_halves: bool = False) -> set[str]:
    """``me``'s bucket key at each of ``levels`` (and its sibling's, with ``both_halves``)."""
    keys = set()
    for level in levels:
        prefix = bucket_prefix(me, level)
        keys.add(bucket_key(key, level, prefix))
        if both_halves and level > 0:
            keys.add(bucket_key(key, level, prefix ^ 1))
    return keys


async def _get_all(dht: EntryReader, key: str, keys: set[str], probed: set[str] = frozenset()) -> dict[str, dict[str, Entry]]:
    """The entries under each of ``keys`` (``key``'s bucket keys), read at once, those in
    ``probed`` as probes."""
    read: dict[str, dict[str, Entry]] = {}

    async def read_key(one: str) -> None:
        read[one] = await dht.get(one, probe=one in probed, fanout=None if one == key else SPLIT_READ_FANOUT)

    async with trio.open_nursery() as nursery:
        for one in sorted(keys):
            nursery.start_soon(read_key, one)
    return read
