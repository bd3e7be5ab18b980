"""Scale simulator, second part: what Legion's DHT keys cost the nodes that hold them, at N peers.

Every peer, every heartbeat, does what the real code does: it writes its run-board entry, its
member announcement and its checkpoint holdings (``swarm.trainer``, ``swarm.peer``,
``bootstrap.checkpoint_swarm``) when due (every ``SPLIT_REFRESH_BEATS`` heartbeats once their key
is split), reads its view of the run board as often, writes its member and holdings
entries at the level that read found (``BucketPlace.adopt``; they follow their own every
``LEVEL_READ_BEATS`` heartbeats only until the first), declares in its round's matchmaking bucket
once a round and reads it as a seeker does until its budget ends (``matchmaking_reads``; a twelfth
of the peers each heartbeat; its traffic is counted apart from the heartbeats' upkeep); a few peers publish the run's configuration; joining peers (``--churn``)
find their levels first and read the configuration. The reads run the real
``dht.buckets.BucketPlace`` reads over a model DHT: each key is held by the ``K`` nodes whose ids are
XOR-closest to its hash, a write goes to all of them and a read asks some of them. The entries
are real ``Entry`` objects holding real values, so bytes are the real sizes.

Costs are counted per node: bytes up and down and CPU seconds at the per-entry costs measured on
this machine with the real merging store and bundle decoder (``calibrate``). Every DHT message also
costs its measured bytes on the wire besides the entries it carries (``MessageBytes``, from
``bench/dht_request_cost.py``: ~1-9 KB, more than an entry; a new stream's opening where the peer
keeps none to the node, since 2026-12-06), split evenly between its two ends;
before 2026-12-05 the simulator charged none, and its per-peer figures left most of the traffic out. A read
asks its replicas as ``RecordDHT.get`` does (every holder of an empty key, one for a probe), and a
key's closest nodes are looked up again every ``LOOKUP_SECONDS`` while a peer uses the key
(``lookup_queries`` FIND_NODE queries each, a model). Two protocols side by side:

- ``flat`` (until 2026-12-04): every all-peer key one DHT key, the run's configuration in every
  board entry, a read asks all ``K`` holders, py-libp2p's answers (closer peers with their signed
  records) and its 30 s lookup cache;
- ``buckets`` (now): the board, members and holdings split (``dht.buckets``), refreshed every
  ``SPLIT_REFRESH_BEATS`` heartbeats once split, the configuration under its own key, entries
  written to and read from the ``SHORT_LIVED_REPLICAS`` closest nodes only, a read asks
  ``READ_FANOUT`` of them drawn at random (``RecordDHT.get``), one for a split bucket key
  (``dht.buckets.SPLIT_READ_FANOUT``), Legion's lean answers, and rereads as deltas (since
  2026-12-06, ``DELTA_READS``): a reader names the entries its last read of a key found, 8 bytes
  each, and a replica names back those it holds and sends only the others; a first read asks one
  replica, then the others against its answer. Since 2026-12-07: a round's keys held at its
  rotation's nodes (``ROTATION``, ``groups.rotation_of``), and a reread of a replica that answered
  before naming only its token (``TOKEN_READS``, ``dht.told``).

Since 2026-12-07 the simulator also counts the second level of two-level rounds (``_cells``): each
peer seeks under its cell's key with the owners of that cell in every group of the round.

Shard bids stay one key in both (sharded runs only; not counted here).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from averaging.groups import ROTATION_ROUNDS, bucket_count, bucket_of  # noqa: E402
from averaging.matchmaking import FIRST_REREAD_SECONDS, MAX_REREAD_SECONDS  # noqa: E402
from bootstrap.advert import Holding, holdings_key, holdings_value  # noqa: E402
from dht.buckets import SPLIT_REFRESH_BEATS, BucketPlace  # noqa: E402
from dht.node import LOOKUP_SECONDS, READ_FANOUT, SHORT_LIVED_REPLICAS  # noqa: E402
from dht.streams import CLIENT_IDLE_SECONDS  # noqa: E402
from dht.records import (DIGEST_BYTES, MAX_BUNDLE_BYTES, Entry, decode_bundle_lenient, encode_bundle,  # noqa: E402
                         entry_bytes, sign_entry)
from dht.store import MergingValueStore  # noqa: E402
from swarm.members import Announcement, members_key  # noqa: E402
from swarm.run_board import RUN_CONFIG_HEARTBEATS, Progress, publishes_config, run_configs_key, run_key  # noqa: E402
from swarm.run_config import PROTOCOL as RUN_PROTOCOL, RunConfig  # noqa: E402

K = 20  # replicas per key (py-libp2p's bucket size)
HEARTBEAT = 5.0  # PeerConfig's default
TTL = 2.5 * HEARTBEAT
SWARM = "sim"
GROUP_TARGET = 16
ROUND_SECONDS = 60.0  # a DiLoCo round of a few hundred inner steps
MM_BUDGET = 10.0  # DiLoCo's matchmaking budget (``swarm.trainer``)
DELTA_READS = True  # ``buckets`` rereads a key as a delta (``dht.seen``)
CELL_LEVEL = True  # ``buckets`` counts the cells of two-level rounds (``_cells``)
ROTATION = True  # ``buckets`` draws buckets by rotation and holds keys at its nodes (``groups.rotation_of``)
DIGESTS_TAG_BYTES = 20  # ``dht.records._READ_TAG``, with the framing
TOKEN_READS = True  # ``buckets`` rereads a replica by its last answer's token (since 2026-12-07, ``dht.told``)
TOKEN_REQUEST_BYTES = 30  # a request naming a token (``dht.records.encode_read``, with the framing)
TOKEN_ANSWER_BYTES = 32  # an answer's token and flag (``read_answer``), with the framing; a dropped digest each


def matchmaking_reads(budget: float = MM_BUDGET) -> int:
    """Reads of a round's matchmaking bucket by one seeker: its buckets hold half the target size
    to the target on average, so most never fill and their seekers read until the budget ends, on
    ``averaging.matchmaking``'s schedule (8 in a 10 s budget)."""
    reads, waited, pause = 1, 0.0, FIRST_REREAD_SECONDS
    while waited < budget:
        waited += min(pause, budget - waited)
        reads, pause = reads + 1, min(MAX_REREAD_SECONDS, 2 * pause)
    return reads


SETTLE_BEATS = 8 * SPLIT_REFRESH_BEATS  # not counted: every peer starts at once, and levels move one a read (every 30 s once split)


@dataclass(frozen=True)
class Costs:
    """Seconds of one core per entry, measured with the real code."""

    put_per_stored_entry: float  # a node merging one writer's entry into a bundle it holds (besides verifying it)
    get_per_stored_entry: float  # a node answering a read of a bundle it holds
    verify_per_entry: float  # a reader checking an entry it has not seen (an Ed25519 verification)
    decode_per_entry: float  # a reader decoding an entry it verified already (another replica's copy)


@dataclass(frozen=True)
class MessageBytes:
    """Bytes on the wire of one DHT message and its answer besides the entries they carry (both
    directions, TCP/IP headers included), measured with the real code (``bench/dht_request_cost.py``)."""

    read: float  # GET_VALUE
    write: float  # PUT_VALUE (the entry itself moves twice: the server echoes it)
    find_node: float  # one query of a lookup (an answer lists 20 closer peers)
    stream: float = 0.0  # besides, a new stream's opening and closing, where none to the node is kept open
    kept_seconds: float = 0.0  # how long a stream to a node is kept open after a message (0: none kept)


MESSAGES = ("read_empty_key", "write_one_entry", "find_node")


def measure_messages(lean: bool) -> MessageBytes:
    """``MessageBytes`` of servers answering as Legion's do (``lean``: on streams kept open, as
    Legion's client sends since 2026-12-06, ``dht.streams``) or as py-libp2p's do (a new stream
    for every message, as its client sends)."""
    import logging

    from dht_request_cost import measure

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    measured = trio.run(measure, 50, 24, lean)
    new, kept = measured["new_stream_overhead_bytes"], measured["overhead_bytes"]
    if not lean:
        return MessageBytes(*(new[name] for name in MESSAGES))
    stream = sum(new[name] - kept[name] for name in MESSAGES) / len(MESSAGES)
    return MessageBytes(*(kept[name] for name in MESSAGES), stream=stream, kept_seconds=CLIENT_IDLE_SECONDS)


def lookup_queries(n: int) -> int:
    """FIND_NODE queries of one closest-peer lookup in a swarm of ``n``: rounds of 3 (py-libp2p's
    alpha) until no closer peer turns up, one round per factor of 16 beyond the 20 peers of an
    answer plus one that finds nothing closer. A model (Kademlia's log(N) hops), not measured."""
    return 3 * (1 + max(1, math.ceil(math.log(max(n, 21) / 20, 16))))


def calibrate(entries: int = 256, repeats: int = 5) -> Costs:
    """Time the real ``MergingValueStore`` and bundle decoder on bundles of ``entries`` signed entries."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    key = "/legion/calibrate/run"
    pairs = [create_new_key_pair() for _ in range(entries + 1)]
    value = _board_value()
    signed = [sign_entry(key, pair, value, 600) for pair in pairs]
    store = MergingValueStore(host=None, local_peer_id=ID.from_pubkey(pairs[0].public_key))
    key_bytes = key.encode()
    from libp2p.kad_dht.pb.kademlia_pb2 import Record

    store.put_record(key_bytes, Record(key=key_bytes, value=encode_bundle(signed[:entries])))
    one = Record(key=key_bytes, value=encode_bundle(signed[entries:]))
    store.put_record(key_bytes, one)  # its signature checked once: each put's verification is counted apart
    started = time.perf_counter()
    for _ in range(repeats):
        store.put_record(key_bytes, one)
    put = (time.perf_counter() - started) / repeats / entries
    started = time.perf_counter()
    for _ in range(repeats):
        store.get(key_bytes)
    get = (time.perf_counter() - started) / repeats / entries
    fresh = [sign_entry(key, pair, value, 600) for pair in pairs[:entries]]  # not in the verified cache
    bundle = encode_bundle(fresh)
    started = time.perf_counter()
    decode_bundle_lenient(key, bundle)
    verify = (time.perf_counter() - started) / entries
    started = time.perf_counter()
    for _ in range(repeats):
        decode_bundle_lenient(key, bundle)
    decode = (time.perf_counter() - started) / repeats / entries
    return Costs(put, get, verify, decode)


def _board_value(with_config: bool = False, with_group: bool = True) -> dict:
    """A board entry (since 2026-12-05 late with the weights' digest at its round); since
    2026-12-04 late only a group's first member lists the group. The flat
    protocol's (``with_config``) has the configuration inside and every field by its name, as
    until 2026-12-04 (short names since 2026-12-05)."""
    config = RunConfig(model="tiny").validate()
    progress = Progress(config.run_id, RUN_PROTOCOL, round=1234, step=56789, samples=10**6,
                        loss=2.5, val_loss=2.6, tokens_per_second=1234.5, bytes_sent=10**9, bytes_received=10**9,
                        group_size=16, training=True, rounds_averaged=1200, group_key="diloco-1233",
                        base="1234:0123456789ab",
                        group=[f"12D3KooW{'x' * 44}"] * 16 if with_group else [])
    if with_config:
        named = {name: value for name, value in asdict(progress).items() if name != "peer_id"}
        return {**named, "config": config.to_dict()}
    return progress.to_value()


def _member_value() -> dict:
    addrs = ["/ip4/203.0.113.7/tcp/31337", "/ip4/192.168.1.20/tcp/31337",
             f"/ip4/198.51.100.1/tcp/4001/p2p/12D3KooW{'r' * 44}/p2p-circuit"]
    return Announcement(addrs, "peer", "0.9.0", time.time(), 8, 16 << 30, None, 20.0, 100.0, "measured",
                        "public").to_value()


def _holdings_value() -> dict:
    return holdings_value([Holding("", "0123456789abcdef", bytes(32), 1233 - i, 40, 40) for i in range(2)])


def _mm_value() -> dict:
    return {"addrs": _member_value()["addrs"], "total": 10**7, "codec": "int8", "coords": [12.5, -3.25, 8.0, 1.0],
            "upload_mbps": 20.0, "target": GROUP_TARGET, "reach": "public", "base": "f" * 24}


VALUES = {"board": lambda: _board_value(with_group=False), "board-group": _board_value, "board-with-config": lambda: _board_value(True), "members": _member_value, "holdings": _holdings_value, "mm": _mm_value,
          "config": lambda: RunConfig(model="tiny").validate().to_dict()}
BASE_KEYS = {"board": run_key(SWARM), "members": members_key(SWARM), "holdings": holdings_key(SWARM)}


@dataclass
class LoadDHT:
    """Keys at their ``replicas`` XOR-closest nodes, with per-node bytes and CPU seconds."""

    peers: list[str]
    costs: Costs
    messages: MessageBytes
    fanout: int = K
    replicas: int = K
    lookup_seconds: float = LOOKUP_SECONDS
    delta_reads: bool = False
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    up: np.ndarray = field(init=False)
    down: np.ndarray = field(init=False)
    cpu: np.ndarray = field(init=False)
    own_traffic: np.ndarray = field(init=False)  # bytes of each peer's own reads and writes (not its serving)...
    own_matchmaking: np.ndarray = field(init=False)  # ...but those of matchmaking, once a round
    own_cells: np.ndarray = field(init=False)  # ...of which those of two-level rounds' cells
    keys: dict[str, dict[str, Entry]] = field(default_factory=dict)
    key_bytes: dict[str, int] = field(default_factory=dict)
    _holders: dict[str, np.ndarray] = field(default_factory=dict)
    _index: dict[str, int] = field(default_factory=dict)
    _templates: dict[str, Entry] = field(default_factory=dict)
    counting_contacts: bool = False
    _looked_up: dict[tuple[int, str], float] = field(default_factory=dict)  # (peer, key) -> when it looked up
    own_requests: np.ndarray = field(init=False)  # messages each peer sent for its upkeep (matchmaking apart)
    _contacts: list[np.ndarray] = field(default_factory=list)  # pairs of peers that exchanged a message
    _streams: dict[tuple[int, int], float] = field(default_factory=dict)  # (peer, node) -> its last message
    _writes: int = 0  # writes so far (an entry is numbered by the write that made it)
    _written: dict[tuple[str, str], int] = field(default_factory=dict)  # (key, writer) -> the write that made its entry
    _read: dict[tuple[int, str], int] = field(default_factory=dict)  # (reader, key) -> writes before its last read
    _told: dict[tuple[int, str, int], int] = field(default_factory=dict)  # (reader, key, holder) -> the same, its last answer

    def __post_init__(self) -> None:
        # the simulated clock, a heartbeat a step; a day ahead of the real one, which ``merge`` expires
        # entries by (a slow run at 10,000 peers fell behind the real clock, and every entry expired)
        self.now = time.time() + 86400
        n = len(self.peers)
        self.up, self.down, self.cpu, self.own_traffic, self.own_matchmaking, self.own_cells, self.own_requests = (
            np.zeros(n) for _ in range(7))
        self._ids = np.array([int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") for p in self.peers],
                             dtype=np.uint64)
        self._index = {p: i for i, p in enumerate(self.peers)}

    def holders(self, key: str) -> np.ndarray:
        if key not in self._holders:
            target = np.uint64(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
            distance = self._ids ^ target
            k = min(self.replicas, len(self.peers))
            self._holders[key] = np.argpartition(distance, k - 1)[:k]
        return self._holders[key]

    def entry(self, kind: str, peer: str, ttl: float = TTL) -> Entry:
        """``peer``'s entry of ``kind``: the real value, a placeholder signature of the real length."""
        if kind not in self._templates:
            value = msgpack.packb(VALUES[kind](), use_bin_type=True)
            self._templates[kind] = Entry("", value, 0.0, 0.0, bytes(64))
        template = self._templates[kind]
        return SimEntry(peer, template.value_bytes, self.now, self.now + ttl, template.signature)

    def tick(self) -> None:
        """A heartbeat later: entries not refreshed within their lifetime expire (and streams
        idle longer than they are kept are forgotten, every few heartbeats)."""
        self.now += HEARTBEAT
        if self._streams and round(self.now / HEARTBEAT) % 12 == 0:
            self._streams = {pair: last for pair, last in self._streams.items()
                             if self.now - last <= self.messages.kept_seconds}
        for key, bundle in list(self.keys.items()):
            for peer in [p for p, e in bundle.items() if e.expiration <= self.now]:
                self.key_bytes[key] -= entry_bytes(bundle.pop(peer))
                self._written.pop((key, peer), None)
            if not bundle:
                del self.keys[key], self.key_bytes[key]
        if self._read and round(self.now / HEARTBEAT) % 12 == 0:  # what readers saw of keys gone since
            self._read = {seen: at for seen, at in self._read.items() if seen[1] in self.keys}
            self._told = {told: at for told, at in self._told.items() if told[1] in self.keys}

    def store(self, writer: str, key: str, entry: Entry, place: str | None = None) -> None:
        """A write of ``entry`` to each of the key's holders (after a lookup of them, where the
        writer's is older than ``lookup_seconds``); a message's overhead is split evenly between
        its two directions. ``place``: the key whose holders hold this one (``RecordDHT.store``)."""
        size = entry_bytes(entry)
        bundle = self.keys.setdefault(key, {})
        old = bundle.get(writer)
        holders = self.holders(place or key)
        me = self._index[writer]
        self._lookup(me, place or key)
        overhead = self._overhead(me, holders, self.messages.write) / 2
        self.down[holders] += size + overhead
        self.up[holders] += size + overhead  # the echo
        self.cpu[holders] += self.costs.verify_per_entry + self.costs.put_per_stored_entry * (len(bundle) + 1)
        self._contact(me, holders)
        self.up[me] += size * len(holders) + overhead.sum()
        self.down[me] += size * len(holders) + overhead.sum()
        self._count(me, key, 2 * (size * len(holders) + overhead.sum()), len(holders))
        bundle[writer] = entry
        self.key_bytes[key] = self.key_bytes.get(key, 0) + size - (entry_bytes(old) if old else 0)
        self._writes += 1
        self._written[(key, writer)] = self._writes

    def charge_get(self, reader: str, key: str, every_replica: bool = False, fanout: int | None = None,
                   probe: bool = False, place: str | None = None) -> None:
        """A read of ``key`` as ``RecordDHT.get`` reads (after a lookup, where the reader's is older
        than ``lookup_seconds``): ``fanout`` (the simulation's, unless given) of its holders, drawn
        at random, each send the bundle (cut at the bundle cap); an empty key is asked of every
        holder, or of one for a ``probe``. With ``delta_reads``, a reader that read the key before
        names the entries it found, and the holders name them back (every holder holds every entry
        here: a write goes to all) and send the others; a first read of several holders gets one's
        bundle, then the others' deltas against it. With ``TOKEN_READS`` a holder that answered the
        reader before is sent its token, and sends what was written since that answer, naming a
        dropped digest for each (at most: an entry that replaced its writer's older one)."""
        bundle = self.keys.get(key, {})
        entries = len(bundle)
        size = min(self.key_bytes.get(key, 0), MAX_BUNDLE_BYTES)
        holders = self.holders(place or key)
        fanout = 1 if probe and not entries else len(holders) if not entries else fanout or self.fanout
        # (in random order, as ``RecordDHT.get`` asks them: a first read's bundle comes from any;
        # until 2026-12-07 always from the same, which made it the busiest node of a popular key)
        served = self.rng.permutation(holders) if every_replica or fanout >= len(holders) else \
            self.rng.choice(holders, fanout, replace=False)
        me = self._index[reader]
        answers = np.full(len(served), float(size))  # bytes of entries (and digests) each holder sends
        requests = np.zeros(len(served))  # ... and of the digests the reader names to it
        sent = entries  # entries the reader decodes
        if self.delta_reads and entries:
            last = self._read.get((me, key))
            self._read[(me, key)] = self._writes
            digests = DIGESTS_TAG_BYTES + DIGEST_BYTES * entries
            if last is not None:  # a reread: each holder names back what the reader named and sends the rest
                fresh = [e for w, e in bundle.items() if self._written[(key, w)] > last]
                answers[:] = min(size, sum(map(entry_bytes, fresh))) + digests - DIGEST_BYTES * len(fresh)
                requests[:] = digests - DIGEST_BYTES * len(fresh)
                sent = len(fresh)
                for i, holder in enumerate(served.tolist() if TOKEN_READS else ()):
                    told = self._told.get((me, key, holder))
                    if told is not None:  # ...or, to a token, names what it dropped and sends what it gained since
                        since = [e for w, e in bundle.items() if self._written[(key, w)] > told]
                        answers[i] = min(size, sum(map(entry_bytes, since))) + TOKEN_ANSWER_BYTES + DIGEST_BYTES * len(since)
                        requests[i] = TOKEN_REQUEST_BYTES
            elif len(served) > 1:  # a first read: one holder's bundle, the others' deltas against it
                answers[1:] = requests[1:] = digests
            for holder in served.tolist():
                self._told[(me, key, holder)] = self._writes
        overhead = self._overhead(me, served, self.messages.read) / 2
        self.up[served] += answers + overhead
        self.down[served] += overhead + requests
        self.cpu[served] += self.costs.get_per_stored_entry * entries
        self._lookup(me, place or key)
        self._contact(me, served)
        self.down[me] += answers.sum() + overhead.sum()
        self.up[me] += overhead.sum() + requests.sum()
        self._count(me, key, answers.sum() + requests.sum() + 2 * overhead.sum(), len(served))
        shown = sent if not sent else min(sent, sent * MAX_BUNDLE_BYTES // max(1, self.key_bytes[key]))
        decoded = 1 if self.delta_reads else len(served)  # copies of each entry decoded
        self.cpu[me] += shown * (self.costs.verify_per_entry + (decoded - 1) * self.costs.decode_per_entry)

    def _lookup(self, me: int, key: str) -> None:
        """``me``'s lookups of ``key``'s closest nodes, one every ``lookup_seconds`` while it uses
        the key (``RecordDHT._closest_peers`` caches them), charged as a share of one at each use
        (the time since the last use over ``lookup_seconds``; a whole one at the first), so that
        a window shorter than ``lookup_seconds`` counts them at their average rate. A lookup is
        ``lookup_queries`` FIND_NODE queries, the last round's 3 to the key's holders, the others
        to nodes at random."""
        last = self._looked_up.get((me, key))
        share = 1.0 if last is None else min(1.0, (self.now - last) / self.lookup_seconds)
        self._looked_up[(me, key)] = self.now
        if not share:
            return
        queries = lookup_queries(len(self.peers))
        asked = np.concatenate([self.rng.choice(self.holders(key), min(3, len(self.holders(key))), replace=False),
                                self.rng.integers(0, len(self.peers), max(0, queries - 3))])
        each = self._overhead(me, asked, self.messages.find_node) * share
        np.add.at(self.up, asked, each / 2)
        np.add.at(self.down, asked, each / 2)
        self.up[me] += each.sum() / 2
        self.down[me] += each.sum() / 2
        self._count(me, key, each.sum(), share * len(asked))

    def _overhead(self, me: int, nodes: np.ndarray, message: float) -> np.ndarray:
        """A message's bytes besides its entries, to each of ``nodes``: ``message``, and a stream's
        opening where ``me`` keeps none open to the node (none sent within ``kept_seconds``)."""
        if not self.messages.stream:
            return np.full(len(nodes), message)
        opened = np.empty(len(nodes))
        for i, node in enumerate(nodes.tolist()):
            last = self._streams.get((me, node))
            opened[i] = last is None or self.now - last > self.messages.kept_seconds
            self._streams[(me, node)] = self.now
        return message + self.messages.stream * opened

    def _count(self, me: int, key: str, traffic: float, messages: int) -> None:
        """``me``'s own traffic and messages for ``key``: its upkeep's, or its matchmaking's."""
        if "/mm/" in key:
            self.own_matchmaking[me] += traffic
            if "/cells/" in key:
                self.own_cells[me] += traffic
        else:
            self.own_traffic[me] += traffic
            self.own_requests[me] += messages

    def _contact(self, me: int, others: np.ndarray) -> None:
        if self.counting_contacts:
            n = np.uint64(len(self.peers))
            a, b = np.minimum(others, me).astype(np.uint64), np.maximum(others, me).astype(np.uint64)
            self._contacts.append((a * n + b)[a != b])

    def contacts_per_peer(self) -> np.ndarray:
        """How many distinct peers each peer exchanged DHT messages with while counting: the
        connections it needs open to do so without redialling (lookups' routing hops not counted)."""
        n = len(self.peers)
        if not self._contacts:
            return np.zeros(n, dtype=np.int64)
        pairs = np.unique(np.concatenate(self._contacts))
        ends = np.concatenate([pairs // np.uint64(n), pairs % np.uint64(n)]).astype(np.int64)
        return np.bincount(ends, minlength=n)

    def reader(self, peer: str) -> "ReaderView":
        return ReaderView(self, peer)


class SimEntry(Entry):
    """An entry whose value the simulated readers do not decode (their parser ignores it)."""

    @property
    def value(self) -> None:
        return None


class ReaderView:
    """``LoadDHT`` as one peer's ``RecordDHT``: what ``BucketPlace`` reads call."""

    def __init__(self, dht: LoadDHT, peer: str) -> None:
        self.dht, self.peer = dht, peer

    async def get(self, key: str, *, probe: bool = False, fanout: int | None = None) -> dict[str, Entry]:
        self.dht.charge_get(self.peer, key, fanout=fanout, probe=probe)
        return self.dht.keys.get(key, {})


async def _heartbeat(dht: LoadDHT, protocol: str, places: dict[tuple[str, str], BucketPlace], beat: int,
                     joiners: set[str], estimates: list[float]) -> None:
    """One heartbeat of every peer, as the real code does it."""
    n = len(dht.peers)
    for peer in dht.peers:
        view = dht.reader(peer)
        peer_hash = int(hashlib.sha256(peer.encode()).hexdigest(), 16)
        board_level = None  # the level this heartbeat's board read found, if it read
        for kind in ("board", "members", "holdings"):
            base = BASE_KEYS[kind]
            if protocol == "flat":
                if kind == "board":
                    dht.charge_get(peer, base)
                dht.store(peer, base, dht.entry("board-with-config" if kind == "board" else kind, peer))
                continue
            place = places.get((peer, kind))
            if place is None:  # a newcomer (or one in a leaver's place): it finds its level before it writes
                place = places[(peer, kind)] = BucketPlace(base, lambda s, v: s, kind, peer)
            if kind == "board":  # the trainer reads its bucket as often as entries are refreshed
                known, phase = place.level is not None, peer_hash % SPLIT_REFRESH_BEATS
                if (beat + phase) % place.refresh_beats == 0:
                    read = await place.read(view)
                    board_level = read.level
                    if beat == 0 and known:
                        estimates.append(read.estimate / n)
            else:  # members, holdings: at the board's level (read to follow it without)
                if board_level is not None:
                    place.adopt(board_level)
                await place.follow(view)
            if place.refresh_due():  # every heartbeat, every SPLIT_REFRESH_BEATS once split (living as much longer)
                lists_group = kind == "board" and peer_hash % GROUP_TARGET == 0
                dht.store(peer, place.own_key, dht.entry("board-group" if lists_group else kind, peer,
                                                         TTL * place.refresh_beats))
                place.wrote()
    if protocol != "flat":  # (flat: the configuration came with every board entry)
        # the run's configuration: a few peers publish it, refreshed at a third of its lifetime; joiners read it
        config_ttl = RUN_CONFIG_HEARTBEATS * HEARTBEAT
        for peer in dht.peers:
            if publishes_config(peer, n) and beat % (RUN_CONFIG_HEARTBEATS // 3) == 0:
                dht.store(peer, run_configs_key(SWARM), dht.entry("config", peer, config_ttl))
        for peer in joiners:
            dht.charge_get(peer, run_configs_key(SWARM))
    # matchmaking: a round every ROUND_SECONDS, each peer matching once a round; a heartbeat's
    # share of the peers, in turn, each share under its own key, in its share of the round's
    # buckets, so that a bucket holds as many seekers as a whole round's (until 2026-12-06 the
    # share sought in all of them: ~1 seeker a bucket, a twelfth of a real round's)
    round_key = f"/legion/{SWARM}/mm/run/diloco-{beat}"
    beats_per_round = round(ROUND_SECONDS / HEARTBEAT)
    share = beat % beats_per_round
    matching = dht.peers[share * n // beats_per_round:(share + 1) * n // beats_per_round]
    count = max(1, round(bucket_count(n, GROUP_TARGET) * len(matching) / n)) if protocol == "buckets" else 1
    # with rotations (since 2026-12-07, ``groups.rotation_of``), a share's buckets are drawn by
    # the round's place in its cycle, and each bucket's key is held at its rotation's nodes
    phase = (beat // beats_per_round) % ROTATION_ROUNDS
    rotation = f"/legion/{SWARM}/mm/run/diloco.{share}@{phase}" if protocol == "buckets" and ROTATION else None
    keys = {}  # peer -> (its bucket's key, where it is held)
    for peer in matching:
        if count == 1:
            keys[peer] = (round_key, rotation)
        else:
            bucket = f"{count}.{bucket_of(peer, rotation or round_key, count)}"
            keys[peer] = (f"{round_key}/{bucket}", rotation and f"{rotation}/{bucket}")
        dht.store(peer, keys[peer][0], dht.entry("mm", peer), place=keys[peer][1])
    reads = matchmaking_reads()
    for peer in matching:
        for _ in range(reads):
            dht.charge_get(peer, keys[peer][0], every_replica=True, place=keys[peer][1])
    if protocol == "buckets" and CELL_LEVEL and n >= 2 * GROUP_TARGET:
        _cells(dht, beat, beats_per_round, matching, reads)


def _cells(dht: LoadDHT, beat: int, beats_per_round: int, matching: list[str], reads: int) -> None:
    """The second level of a round (``Averager._cross_groups``; counted since 2026-12-07): each
    member of a group owns one of the round's ``GROUP_TARGET`` cells and seeks under that cell's
    key with its owners in every group of the round (the cells' matchmaker is one key a cell, not
    bucketed), reading it as a seeker does (its budget, modelled as ``reads``). The owners of a
    whole round declare at its start, and each heartbeat's share reads: a reader sees every group's
    owner, as the last reads of a real round do. With rotations, a cell's key is held at its
    rotation's nodes, and a peer owns the same cell each cycle (a group of the same members, as
    a bucket of one group holds, in the same order)."""
    cells_key = f"/legion/{SWARM}/mm/run/diloco-{beat // beats_per_round}/cells/{GROUP_TARGET}"
    rotation = f"/legion/{SWARM}/mm/run/diloco@{(beat // beats_per_round) % ROTATION_ROUNDS}/cells/{GROUP_TARGET}" \
        if ROTATION else None
    cell_of = {peer: bucket_of(peer, rotation or cells_key, GROUP_TARGET) for peer in dht.peers}
    if beat % beats_per_round == 0:
        for peer in dht.peers:
            dht.store(peer, f"{cells_key}.{cell_of[peer]}", dht.entry("mm", peer, ROUND_SECONDS),
                      place=rotation and f"{rotation}.{cell_of[peer]}")
    for peer in matching:
        for _ in range(reads):
            dht.charge_get(peer, f"{cells_key}.{cell_of[peer]}", every_replica=True,
                           place=rotation and f"{rotation}.{cell_of[peer]}")


def simulate(protocol: str, n: int, churn: float, costs: Costs, messages: dict[str, MessageBytes], beats: int,
             seed: int) -> dict:
    """``beats`` measured heartbeats after levels settle; ``churn``: joins (and as many leaves) per
    peer per hour."""
    peers = [hashlib.sha256(f"peer{seed}/{i}".encode()).hexdigest()[:40] for i in range(n)]
    # every entry here is short-lived (SHORT_LIVED_SECONDS): ``buckets`` writes and reads its closest replicas only
    # flat: py-libp2p's answers and its lookup cache (30 s) as they were until 2026-12-05
    dht = LoadDHT(peers, costs, messages["py-libp2p" if protocol == "flat" else "legion"],
                  fanout=K if protocol == "flat" else READ_FANOUT, replicas=K if protocol == "flat" else SHORT_LIVED_REPLICAS,
                  lookup_seconds=30.0 if protocol == "flat" else LOOKUP_SECONDS,
                  delta_reads=protocol != "flat" and DELTA_READS)
    places: dict[tuple[str, str], BucketPlace] = {}  # (peer, kind) -> where that peer reads and writes
    estimates: list[float] = []
    rng = np.random.default_rng(seed)
    started = time.monotonic()

    async def run() -> None:
        for beat in range(-SETTLE_BEATS, beats):
            dht.tick()
            if beat == 0:
                for counter in (dht.up, dht.down, dht.cpu, dht.own_traffic, dht.own_matchmaking, dht.own_cells,
                                dht.own_requests):
                    counter[:] = 0
                dht.counting_contacts = True
            joins = rng.poisson(n * churn / 3600 * HEARTBEAT) if beat >= 0 else 0
            joiners = set(rng.choice(peers, size=min(n, joins), replace=False)) if joins else set()
            for peer in joiners:  # a newcomer in a leaver's place: it knows no level yet
                for kind in BASE_KEYS:
                    places.pop((peer, kind), None)
            await _heartbeat(dht, protocol, places, beat, joiners, estimates)

    trio.run(run)
    seconds = beats * HEARTBEAT
    up_mbps, cpu = dht.up * 8 / seconds / 1e6, dht.cpu / seconds
    legion_keys = [k for k in dht.keys if "/mm/" not in k]
    contacts = dht.contacts_per_peer()
    return {"protocol": protocol, "peers": n, "churn_per_hour": churn, "read_fanout": dht.fanout, "replicas": dht.replicas,
            "busiest_node_mbps": round(float(up_mbps.max()), 3),
            "busiest_node_down_mbps": round(float((dht.down * 8 / seconds / 1e6).max()), 3),
            "busiest_node_cpu": round(float(cpu.max()), 4),
            "median_node_mbps": round(float(np.median(up_mbps)), 4),
            "peer_background_kbps": round(float(np.median(dht.own_traffic)) * 8 / seconds / 1e3, 1),
            "peer_background_kbps_max": round(float(dht.own_traffic.max()) * 8 / seconds / 1e3, 1),
            # each peer matches once a round: the mean over peers is one peer's average over rounds
            "peer_matchmaking_kbps": round(float(dht.own_matchmaking.mean()) * 8 / seconds / 1e3, 1),
            "peer_cells_kbps": round(float(dht.own_cells.mean()) * 8 / seconds / 1e3, 1),  # (of matchmaking's)
            "peer_requests_per_second": round(float(np.median(dht.own_requests)) / seconds, 2),
            "dht_contacts_median": int(np.median(contacts)), "dht_contacts_max": int(contacts.max()),
            "largest_key_entries": max(len(dht.keys[k]) for k in legion_keys),
            "largest_key_kib": round(max(dht.key_bytes[k] for k in legion_keys) / 1024, 1),
            "board_estimate_min_max": [round(min(estimates), 2), round(max(estimates), 2)] if estimates else None,
            "sim_seconds": round(time.monotonic() - started, 1)}


def microseconds(costs: Costs) -> dict:
    return {name: round(value * 1e6, 2) for name, value in vars(costs).items()}
