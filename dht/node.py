"""``RecordDHT``: put and get Legion records on a py-libp2p Kademlia node, every await bounded."""

from __future__ import annotations

import contextlib
import logging
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable, TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.kad_dht import PROTOCOL_ID, DHTMode, KadDHT, get_connection_type
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.record import make_signed_put_record
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from dht.buckets import parse_entries
from dht.records import Entry, RecordError, check_key, decode_answer, digest, encode_bundle, encode_read, merge, sign_entry
from dht.seen import ReplicaView, SeenEntries
from dht.told import ToldReaders
from dht.store import MergingValueStore
from dht.streams import SERVE_IDLE_SECONDS, InboundStreams, ServedStream, StreamPool
from dht.validator import LegionValidator

T = TypeVar("T")

log = logging.getLogger(__name__)

UNREACHABLE_SECONDS = 60.0  # a peer a lookup could not dial is left out of lookups this long
LOOKUP_DIAL_SECONDS = 2.5  # a lookup's dial of a peer it is not connected to (TCP, Noise, Yamux)
UNREACHABLE_CAP = 4096  # peers remembered as undialable
READ_FANOUT = 3  # replicas whose records a read merges (asked at a time, and more where one has none)
# An entry that lives at most SHORT_LIVED_SECONDS (announcements, the run board, holdings, bids,
# matchmaking: rewritten every heartbeat, every few once their key is split (``dht.buckets``, up to
# 180 s), or every round) goes to the SHORT_LIVED_REPLICAS closest of its
# key's replicas, not all 20: a copy lost with its node is written again seconds later, and the 20
# copies were most of a peer's own DHT traffic. Reads ask only those closest replicas, which hold
# long-lived entries too (those go to all 20, the closest among them). Five, as hivemind stores
# each of its regularly refreshed values (``DHTNode.create(num_replicas=5)``); eight cost a peer
# 60% more in writes (``bench/scale.py --only dht``).
SHORT_LIVED_REPLICAS = 5
SMALL_SWARM_REPLICAS = 8
SHORT_LIVED_SECONDS = 180.0
# How long a key's closest nodes, once looked up, are used (dropping one that fails): a lookup is
# several FIND_NODE queries of ~5 KB each on the wire, mostly to nodes a peer keeps no stream to
# (``bench/dht_request_cost.py``), and with churn of 20% an hour a key's closest 5 change about
# every half hour. At 10,000 peers (4 rounds of queries) lookups kept 5 minutes were 40% of a
# peer's upkeep, 22.3 kbit/s; kept 10, 18.4 (``bench/scale.py --only dht``, 2026-12-06). A node
# that joins closer to a key meanwhile is read as an empty replica, passed over.
LOOKUP_SECONDS = 600.0
# A lookup that timed out leaves the routing table's closest nodes for this long
TIMED_OUT_LOOKUP_SECONDS = 30.0
FORGOTTEN_LOOKUP_SECONDS = 60.0  # a key whose cached node failed a request is looked up again within this
# A key none of whose cached nodes may be used now is looked up again, at most this often
UNUSABLE_LOOKUP_SECONDS = 2.0
FIRST_ANSWER_SECONDS = 1.0  # a first read asks one replica, and the others once it answered or after this
GET_VALUE_CLOSER_PEERS = 1  # closer peers in this node's answer to a read (py-libp2p lists 20)
READ_ADDRS_SECONDS = 600  # how long addresses of closer peers in a read's answer are kept (py-libp2p's)
LOOKUP_ADDRS_SECONDS = 3600  # ... in a FIND_NODE answer


@dataclass
class _Lookup:
    """A key's closest nodes as a lookup found them, kept until ``expiry``."""
    expiry: float
    nodes: list[ID]  # closest first, less those forgotten since (``RecordDHT._forget``)
    table: int  # the routing table's size then
    full: bool  # the lookup found as many nodes as the replication factor
    # when a set left with no usable node may be looked up again (one that timed out: at expiry)
    retry: float


class RecordDHT:
    """A Kademlia node (server or client mode) that speaks the standard ``/ipfs/kad/1.0.0`` protocol
    and stores Legion bundles with the merging store and the Legion validator.

    ``timeout`` bounds every network step: a lookup, and each single peer's get or put. The closest
    peers of a key are looked up at most every ``lookup_ttl`` seconds (a peer that fails a request
    is dropped from the cached set), so a heartbeat costs one round of requests, not a lookup too.
    A write goes to all of them, a read to ``read_fanout`` of them (``get``). Messages go out on
    streams kept open per node, and inbound streams are served for many messages (``dht.streams``).
    """

    def __init__(self, host: IHost, key_pair: KeyPair, *, server: bool = True, timeout: float = 5.0,
                 replication: int = BUCKET_SIZE, lookup_ttl: float = LOOKUP_SECONDS, read_fanout: int = READ_FANOUT) -> None:
        self.host = host
        self.read_fanout = read_fanout
        self.key_pair = key_pair
        self.timeout = timeout
        self.replication = replication
        self.lookup_ttl = lookup_ttl
        self._lookups: dict[bytes, _Lookup] = {}
        self._unreachable: dict[ID, float] = {}  # peer -> until when lookups skip it
        self.seen = SeenEntries()  # what the last read of each key found: replicas send the rest
        self.told = ToldReaders()  # what this node last told each reader of each key
        self.on_served: Callable[[float], None] | None = None  # given each inbound request's seconds
        self.kad = KadDHT(host, DHTMode.SERVER if server else DHTMode.CLIENT, strict_validation=True)
        self.kad.register_validator("legion", LegionValidator())
        self.kad.value_store = MergingValueStore(host=host, local_peer_id=host.get_id())
        self.streams = StreamPool(host)
        # py-libp2p serves 12 inbound Kademlia streams at a time and resets any beyond (16 busy
        # peers on 2 cores exceeded that all the time, their reads came back short and no peer
        # ever saw all the others); Legion's caps count streams per peer and in all.
        self.inbound = InboundStreams()
        self.serve_idle_seconds = SERVE_IDLE_SECONDS
        self.kad._add_closer_peers_to_response = self._list_closer_peers
        self.kad.peer_routing._query_peer_for_closest = self._query_dialable_for_closest
        if server:
            host.set_stream_handler(PROTOCOL_ID, self._handle_inbound)

    def _list_closer_peers(self, response: Message, closest: list[ID], exclude_peer_id: ID | None = None) -> None:
        """The closer peers of this node's answers, leaner than py-libp2p's: it lists every one
        with its signed peer record (~350 bytes, and a signature check at the reader), which
        made a read's or lookup's answer ~9 KB in a swarm of 20 or more (``bench/dht_request_cost.py``).
        Listed here: id, connection and addresses, which readers take whether signed or not. A
        read's answer lists ``GET_VALUE_CLOSER_PEERS``: Legion finds a key's replicas with lookups
        (FIND_NODE), and a read's closer peers only tell its reader that the node answered. (They
        also taught peers others' addresses; a peer known only by id is now looked up instead:
        ``swarm.network.look_up_unknown_peers``.)"""
        limit = GET_VALUE_CLOSER_PEERS if response.type == Message.MessageType.GET_VALUE else len(closest)
        peerstore = self.host.get_peerstore()
        for peer in [p for p in closest if p != exclude_peer_id][:limit]:
            entry = response.closerPeers.add()
            entry.id = peer.to_bytes()
            entry.connection = get_connection_type(self.host, peer)
            with contextlib.suppress(Exception):
                entry.addrs.extend(addr.to_bytes() for addr in peerstore.addrs(peer))

    async def _handle_inbound(self, stream: INetStream) -> None:
        """py-libp2p's Kademlia handler serves a stream's messages one after another, reading
        without a deadline. Here a stream gets ``2 × timeout`` for its first message and for each
        message, and waits ``serve_idle_seconds`` for the next; the streams a peer
        (and all peers) hold open are capped (``InboundStreams``); no error escapes to the host."""
        served = ServedStream(stream, first_message_seconds=2 * self.timeout, message_seconds=2 * self.timeout,
                              idle_seconds=self.serve_idle_seconds)
        served.on_answered = self.on_served
        served.told = self.told
        # py-libp2p's handler adds the asking peer to the routing table as a stream opens, which
        # needs its addresses: they come in its first message (its peer record)
        served.after_first_answer = partial(self.kad.add_peer, served.peer, skip_server_mode_check=True)
        if not self.inbound.admit(served):
            log.info("refused a DHT stream from %s: %d streams open", served.peer, len(self.inbound))
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()
            return
        try:
            await self.kad._do_handle_stream(served)  # (py-libp2p's handle_stream without its slot limiter)
        except Exception as exc:
            log.debug("DHT stream from %s failed: %s", served.peer, exc)
        finally:
            self.inbound.release(served)
        if served.expired and not served.messages:
            log.info("closed a DHT stream from %s that sent nothing in %.0f s", served.peer, 2 * self.timeout)

    @asynccontextmanager
    async def running(self) -> AsyncIterator["RecordDHT"]:
        async with background_trio_service(self.kad), trio.open_nursery() as nursery:
            nursery.start_soon(self.streams.close_retired_forever)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await self.streams.aclose()

    @property
    def server(self) -> bool:
        return self.kad.mode == DHTMode.SERVER

    async def set_server(self, server: bool) -> None:
        """Serve the DHT to others (a dialable peer) or only use it (a client: a peer behind NAT,
        which others could not reach to store or read, and whose failures would slow them). Not
        ``KadDHT.switch_mode``: that empties the routing table, which a client still needs. The
        connected peers are told at once (Identify push), so they can ask a new server; they go on
        asking a former server, as py-libp2p's Identify push adds protocols but removes none."""
        if server == self.server:
            return
        self.kad.mode = DHTMode.SERVER if server else DHTMode.CLIENT
        if server:
            self.host.set_stream_handler(PROTOCOL_ID, self._handle_inbound)
        else:
            self.host.remove_stream_handler(PROTOCOL_ID)
        log.info("DHT: %s mode", "server" if server else "client")
        with trio.move_on_after(self.timeout):
            await self.host._push_identify_to_all_peers()

    def _short_lived_replicas(self, closest: list[ID]) -> int:
        """How many of a key's closest nodes hold its short-lived entries: ``SHORT_LIVED_REPLICAS``,
        or ``SMALL_SWARM_REPLICAS`` where the lookup found fewer nodes than the replication factor
        (a small swarm, whose peers' routing tables still differ as they join and start serving:
        a read of 5 of them missed writes to another 5)."""
        return SHORT_LIVED_REPLICAS if len(closest) >= self.replication else SMALL_SWARM_REPLICAS

    async def find_peer(self, peer_id: ID) -> PeerInfo | None:
        """``peer_id`` with its addresses: from the routing table or the peerstore, else from a
        closest-peer lookup of its id; None if not found."""
        return await self.kad.find_peer(peer_id)

    async def add_peer(self, peer_id: ID) -> bool:
        return await self.kad.add_peer(peer_id, skip_server_mode_check=True)

    def routing_table_size(self) -> int:
        return self.kad.get_routing_table_size()

    async def store(self, key: str, value: Any, ttl: float, place: str | None = None) -> int:
        """Write this peer's entry under ``key``; returns how many remote nodes accepted it.
        ``place``: the key whose closest nodes hold this one (itself by default). Keys written
        and read anew every round (matchmaking's) placed at one key share its nodes, and with them
        its lookup (``LOOKUP_SECONDS``) and the streams kept open to them; readers and writers of
        a key must give it the same place."""
        key_bytes, place_bytes = key.encode(), (place or key).encode()
        # The closest peers first, then the entry: a lookup that waits out unreachable peers (behind
        # NAT) takes seconds, and an entry signed before it could expire before it is stored.
        peers = await self._closest_peers(place_bytes)
        if ttl <= SHORT_LIVED_SECONDS:
            peers = peers[:self._short_lived_replicas(peers)]
        entry = sign_entry(key, self.key_pair, value, ttl)
        bundle = encode_bundle([entry])
        record = make_signed_put_record(key_bytes, bundle, self.key_pair.private_key)
        self.kad.value_store.put_record(key_bytes, record)
        accepted = 0

        async def store_at(peer: ID) -> None:
            nonlocal accepted
            with trio.move_on_after(self.timeout):
                if await self._put_at(peer, key_bytes, record):
                    accepted += 1
                    return
            self._forget(place_bytes, peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(store_at, peer)
        log.debug("stored %s at %d of %d peers", key, accepted, len(peers))
        return accepted

    async def withdraw(self, key: str, ttl: float, place: str | None = None) -> int:
        """Replace this peer's entry with a tombstone that outlives it."""
        return await self.store(key, None, ttl, place)

    async def get(self, key: str, *, withdrawn: bool = False, probe: bool = False,
                  every_replica: bool = False, fanout: int | None = None, place: str | None = None) -> dict[str, Entry]:
        """All live, valid, not withdrawn entries under ``key`` (with ``withdrawn``, the live
        tombstones too), merged from this node and the closest nodes to the key; entries that
        fail validation are dropped and logged. The closest few nodes that short-lived entries go
        to (``_short_lived_replicas``) are asked in random order, ``read_fanout`` at a time,
        until ``read_fanout`` of them sent a record: every store goes to all of them, so a few
        replicas' union holds nearly every entry, and asking all 20 of a large swarm would cost
        each read 20 bundles (and each holder every reader's); in a swarm where the lookup finds
        6 or fewer nodes, all are read. A replica without the key is passed over (a young entry
        may not have reached it), so reading an empty key asks them all; with ``probe`` (is anything
        here?) one replica is asked, and only if it holds the key, more. With ``every_replica``
        all are read: a round's matchmaking key is seconds old, its entries still arriving, and
        peers whose views differ form different groups. ``fanout`` replaces ``read_fanout`` for
        this read (where the swarm is not that small). ``place``: as ``store``'s.

        A key read before is read again as a delta: the request names the entries the last read
        found (``seen``) or this node holds, and a replica names back those it holds too and sends
        only the others; a replica that answered before is sent only its answer's token, and
        answers with what it dropped and gained since. The read finds what it would have found in
        full. A key with none of those is asked of one replica first, and of the others, as a
        delta against its answer, once it answered or after ``FIRST_ANSWER_SECONDS``: one bundle
        crosses, not ``fanout``."""
        check_key(key)
        key_bytes = key.encode()
        local = self.kad.value_store.get(key_bytes)
        seen = {digest(e): e for e in self.seen.get(key_bytes)}
        groups: list[list[Entry]] = [self._decode(key, local.value, "local store", seen, None)[0]] if local else []
        seen.update((digest(e), e) for group in groups for e in group)
        views = self.seen.views(key_bytes)
        place_bytes = (place or key).encode()
        closest = await self._closest_peers(place_bytes)
        peers = closest[:self._short_lived_replicas(closest)]
        waiting = random.sample(peers, len(peers))
        # a small swarm's few replicas are all read: cheap there, and its young entries may have
        # reached only some of them (a joiner of 4 peers once missed one seeder's holdings)
        small = len(closest) <= 2 * self.read_fanout
        fanout = len(peers) if every_replica or small else fanout or self.read_fanout
        records = asked = 0  # replicas that sent a record; requests under way
        limit = 1 if probe or not seen else fanout  # replicas to have sent a record or be asked
        first_answered = trio.Event()

        def ask(nursery: trio.Nursery) -> None:
            nonlocal asked
            while waiting and records + asked < limit:
                asked += 1
                nursery.start_soon(get_from, waiting.pop(), nursery)

        async def get_from(peer: ID, nursery: trio.Nursery) -> None:
            nonlocal records, asked, limit
            view = views.get(peer)
            record, answered = None, False
            with trio.move_on_after(self.timeout) as scope:
                record, answered = await self._get_from(peer, key_bytes, encode_read(view[0] if view else b"",
                                                                                    seen.values()))
            if scope.cancelled_caught:
                self._forget(place_bytes, peer)
            asked -= 1
            if answered and record is None:
                views.pop(peer, None)
            if record is not None:  # signatures checked off the event loop: a bundle holds thousands
                records += 1
                entries, views[peer] = await trio.to_thread.run_sync(self._decode, key, record.value,
                                                                     peer.to_base58(), seen, view)
                groups.append(entries)
                seen.update((digest(e), e) for e in entries)
            if not (probe and answered and not records):  # (a probe asks more only where a replica holds the key)
                limit = fanout
            first_answered.set()
            ask(nursery)  # another in place of one that failed or held none

        async with trio.open_nursery() as nursery:
            ask(nursery)
            if not probe and limit < fanout and asked:
                with trio.move_on_after(FIRST_ANSWER_SECONDS):
                    await first_answered.wait()
                limit = fanout
                ask(nursery)
        merged = merge(*groups)
        self.seen.remember(key_bytes, list(merged.values()), {p: v for p, v in views.items() if v is not None})
        return {sub: e for sub, e in merged.items() if withdrawn or not e.withdrawn}

    async def get_parsed(self, key: str, parse: Callable[[str, Any], T], what: str) -> list[T]:
        """Every live entry under ``key`` as ``parse(subkey, value)``; a value that ``parse``
        rejects with ``ValueError`` is dropped and logged as an ignored ``what``."""
        return parse_entries(await self.get(key), parse, what)

    @staticmethod
    def _decode(key: str, data: bytes, source: str, seen: dict[bytes, Entry],
                view: ReplicaView | None) -> tuple[list[Entry], ReplicaView | None]:
        """The entries ``source``'s answer holds (those it sent, and those of ``seen`` it holds
        by its answer: named, or told before with ``view``'s token and not dropped since), and its
        view for the next read (None: none, a node of an earlier version)."""
        try:
            answer = decode_answer(key, data)
            if answer.since and view is None:
                raise RecordError("an answer to a token this node did not send")
        except RecordError as exc:
            log.warning("dropped record for %s from %s: %s", key, source, exc)
            return [], None
        for problem in answer.problems:
            log.warning("dropped entry for %s from %s: %s", key, source, problem)
        # (of the entries named as held, only those this node holds: a replica cannot make its view grow)
        held = view[1] - answer.named if answer.since else frozenset(d for d in answer.named if d in seen)
        entries = answer.entries + [seen[d] for d in held if d in seen]
        return entries, (answer.token, held | {digest(e) for e in answer.entries}) if answer.token else None

    async def _closest_peers(self, key_bytes: bytes) -> list[ID]:
        cached = self._lookups.get(key_bytes)
        # A lookup that found fewer nodes than the replication factor is kept while the routing
        # table has not grown: in a swarm smaller than that factor every set is short, and looking
        # again every few seconds there cost most of the CPU of 16 peers on 2 cores.
        # Which of them this peer may use is asked at each use: a node it could not dial at the
        # lookup may have connected since (peers starting together on a loaded machine). A set
        # left with no usable node is looked up again (``UNUSABLE_LOOKUP_SECONDS`` apart): a home
        # peer whose one reachable node failed a single write (the others behind NAT) read and
        # wrote the run board only locally for ``FORGOTTEN_LOOKUP_SECONDS``, saw nobody join, and
        # waited after the others had finished.
        now = trio.current_time()
        if cached and now < cached.expiry and (cached.full or self.routing_table_size() <= cached.table):
            usable = self._usable(cached.nodes)
            if usable or now < cached.retry:
                return usable
        me = self.host.get_id()
        found: list[ID] | None = None
        started = trio.current_time()
        with trio.move_on_after(self.timeout):
            found = await self.kad.peer_routing.find_closest_peers_network(key_bytes)
        log.debug("closest-peer lookup for %s: %.1f s", key_bytes.decode(errors="replace"), trio.current_time() - started)
        timed_out = found is None
        if found is None:
            log.debug("closest-peer lookup timed out; using the routing table")
            found = self.kad.routing_table.find_local_closest_peers(key_bytes, self.replication)
        # closest first: short-lived entries go to the first few (``SHORT_LIVED_REPLICAS``)
        found = sort_peer_ids_by_distance(key_bytes, [p for p in found if p != me])
        peers = self._usable(found)
        table = self.routing_table_size()
        # A lookup that found fewer nodes than both the factor and the table may have missed peers
        # that did not answer: it is done again sooner. Nodes it found that this peer cannot use
        # (undialable lately, or not serving) do not count against it: a lookup again finds them
        # again (counted, 64 peers on one machine looked most keys up every 5 s, which took both
        # cores: ``bench/matchmaking_swarm.py``), but the set is looked up again once the first of
        # them may be dialled again. One that timed out (a loaded peer or network) leaves the
        # routing table's closest nodes for a while: looking again at once adds load.
        if timed_out:
            ttl = min(self.lookup_ttl, TIMED_OUT_LOOKUP_SECONDS)
        else:
            ttl = self.lookup_ttl if len(found) >= min(self.replication, table) else min(self.lookup_ttl, 5.0)
        now = trio.current_time()
        dialable_again = [until for p in found if (until := self._unreachable.get(p)) is not None and until > now]
        if dialable_again:
            ttl = min(ttl, max(5.0, min(dialable_again) - now))
        retry = now + (ttl if timed_out else UNUSABLE_LOOKUP_SECONDS)
        self._lookups[key_bytes] = _Lookup(now + ttl, found, table, len(found) >= self.replication, retry)
        return peers

    def _usable(self, nodes: list[ID]) -> list[ID]:
        """The first ``replication`` of ``nodes`` that serve the DHT and may be dialled."""
        return [p for p in nodes if self._may_serve(p) and self._dialable(p)][:self.replication]

    async def _query_dialable_for_closest(self, peer: ID, key_bytes: bytes) -> list[ID]:
        """py-libp2p's FIND_NODE query, skipping peers that do not serve or could not be dialled
        lately. A lookup waits for every query of a round, and a peer behind NAT (learnt from the
        peerstore or from another node's answer) would cost each lookup a dial timeout: long
        enough that heartbeat refreshes gave up and peers' entries expired."""
        if not self._may_serve(peer) or not self._dialable(peer):
            return []
        if not self._connected(peer):
            if len(self._unreachable) >= UNREACHABLE_CAP:
                self._unreachable.clear()
            # marked before the dial, so a lookup cancelled mid-dial still counts it as failed
            self._unreachable[peer] = trio.current_time() + UNREACHABLE_SECONDS
            with trio.move_on_after(min(self.timeout, LOOKUP_DIAL_SECONDS)):
                with contextlib.suppress(Exception):
                    await self.host.connect(PeerInfo(peer, self.host.get_peerstore().addrs(peer)))
                    del self._unreachable[peer]
            if peer in self._unreachable:
                log.debug("DHT lookup: could not dial %s; skipping it for %.0f s", peer, UNREACHABLE_SECONDS)
                self.kad.routing_table.remove_peer(peer)
                return []
        return await self._find_node(peer, key_bytes)

    async def _put_at(self, peer: ID, key_bytes: bytes, record: Record) -> bool:
        """Whether ``peer`` stored ``record`` (it echoes a record it stored)."""
        message = Message(type=Message.MessageType.PUT_VALUE, key=key_bytes)
        message.record.CopyFrom(record)
        message.record.ClearField("timeReceived")
        try:
            answer = await self.streams.request(peer, message)
        except Exception as exc:
            log.debug("write of %s to %s failed: %s", key_bytes.decode(errors="replace"), peer, exc)
            return False
        return answer.type == Message.MessageType.PUT_VALUE and answer.key == key_bytes

    async def _get_from(self, peer: ID, key_bytes: bytes, read: bytes = b"") -> tuple[Record | None, bool]:
        """``peer``'s record under ``key_bytes`` (None if it holds none), and whether it answered;
        with ``read`` (``encode_read``), the record is a delta (``dht.records.read_answer``)."""
        request = Message(type=Message.MessageType.GET_VALUE, key=key_bytes)
        if read:
            request.record.value = read  # (the record's key left out: the request's says it)
        try:
            answer = await self.streams.request(peer, request)
        except Exception as exc:
            log.debug("read of %s from %s failed: %s", key_bytes.decode(errors="replace"), peer, exc)
            return None, False
        self._learn_closer(answer, READ_ADDRS_SECONDS)
        if answer.type == Message.MessageType.GET_VALUE and answer.HasField("record") and answer.record.value:
            return answer.record, True
        return None, True

    async def _find_node(self, peer: ID, key_bytes: bytes) -> list[ID]:
        """One FIND_NODE query of a lookup: the closer peers ``peer`` lists, their addresses kept
        and each put in the routing table (as py-libp2p's query does); [] if it failed."""
        with contextlib.suppress(Exception):  # known addresses: ``peer`` goes in the routing table, as py-libp2p's does
            if addrs := self.host.get_peerstore().addrs(peer):
                await self.kad.routing_table.add_peer(PeerInfo(peer, addrs))
        answer = None
        with trio.move_on_after(self.timeout):
            try:
                answer = await self.streams.request(peer, Message(type=Message.MessageType.FIND_NODE, key=key_bytes))
            except Exception as exc:
                log.debug("FIND_NODE query to %s failed: %s", peer, exc)
        if answer is None or answer.type != Message.MessageType.FIND_NODE:
            return []
        found = self._learn_closer(answer, LOOKUP_ADDRS_SECONDS)
        for closer, addrs in found.items():
            with contextlib.suppress(Exception):
                if addrs:
                    await self.kad.routing_table.add_peer(PeerInfo(closer, addrs))
        return list(found)

    def _learn_closer(self, answer: Message, addrs_seconds: float) -> dict[ID, list[Multiaddr]]:
        """The closer peers an answer lists, other than this one, with their well-formed addresses,
        which the peerstore keeps ``addrs_seconds``."""
        me, found = self.host.get_id(), {}
        for listed in answer.closerPeers:
            try:
                peer = ID(listed.id)
            except Exception:
                continue
            if not listed.id or peer == me or peer in found:
                continue
            addrs = []
            for raw in listed.addrs:
                with contextlib.suppress(Exception):
                    addrs.append(Multiaddr(raw))
            if addrs:
                self.host.get_peerstore().add_addrs(peer, addrs, addrs_seconds)
            found[peer] = addrs
        return found

    def _dialable(self, peer: ID) -> bool:
        """False for a peer a lookup could not dial in the last ``UNREACHABLE_SECONDS``, unless it
        is connected now: a dial that timed out on a loaded machine left peers that connected a
        moment later out of every lookup's set for a minute (11 peers started at once on 2 cores:
        a long-lived entry reached 4 of 9 replicas)."""
        until = self._unreachable.get(peer)
        if until is not None and (trio.current_time() >= until or self._connected(peer)):
            del self._unreachable[peer]
            return True
        return until is None

    def _connected(self, peer: ID) -> bool:
        return peer in self.host.get_network().connections

    def _may_serve(self, peer: ID) -> bool:
        """False for a peer whose Identify says it does not serve the DHT: a client, which
        py-libp2p puts in the routing table when it sends a request."""
        try:
            protocols = self.host.get_peerstore().get_protocols(peer)
        except Exception:  # nothing known of it
            return True
        if protocols and PROTOCOL_ID not in protocols:
            self.kad.routing_table.remove_peer(peer)
            return False
        return True

    def look_up_again(self) -> None:
        """Drop every key's cached closest nodes: each is looked up at its next use. For a peer
        whose view of the swarm may be stale: a node forgotten during a partition stays out of a
        key's set for up to ``FORGOTTEN_LOOKUP_SECONDS`` after it heals, and in a chaos run three
        peers that read the run board from their half's nodes only never saw four others finish."""
        self._lookups.clear()

    def _forget(self, key_bytes: bytes, peer: ID) -> None:
        """Drop ``peer`` from the key's cached closest nodes, and look the key up again within
        ``FORGOTTEN_LOOKUP_SECONDS``: a node that failed once (a partition, a restart) may be back
        by then, and kept out of the set for the lookup's 10 minutes, the two halves of a healed
        partition read and wrote the run board each at its own nodes, and trained apart to the
        end (``bench/chaos.py --kinds partition``). Where no usable node is left, the key is
        looked up again at its next use (``_closest_peers``)."""
        cached = self._lookups.get(key_bytes)
        if cached and peer in cached.nodes:
            cached.nodes = [p for p in cached.nodes if p != peer]
            cached.expiry = min(cached.expiry, trio.current_time() + FORGOTTEN_LOOKUP_SECONDS)
