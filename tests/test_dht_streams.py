"""Kademlia streams kept open (``dht.streams``): messages to a node share one stream, a node serves
many messages on it and closes it once idle, and the streams one peer holds open are capped."""

from __future__ import annotations

import contextlib
import logging
import time

import msgpack
import multiaddr
import trio
import varint
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.exceptions import StreamFailure
from libp2p.kad_dht.kad_dht import PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.record import make_signed_put_record

from dht import RecordDHT
from dht.node import FIRST_ANSWER_SECONDS, FORGOTTEN_LOOKUP_SECONDS, TIMED_OUT_LOOKUP_SECONDS, UNUSABLE_LOOKUP_SECONDS
from dht.records import MAX_KNOWN, decode_answer, decode_bundle_strict, digest, encode_bundle, encode_read, sign_entry
from dht.seen import SeenEntries
from dht.told import ToldReaders
from dht.streams import ServedStream
from swarm.network import build_host

KEY = "/legion/default/test/streams"


@contextlib.asynccontextmanager
async def servers_and_client(servers: int, timeout: float = 5.0):
    """``servers`` DHT servers and a client connected to each: (servers, client, client's key pair)."""
    pairs = [create_new_key_pair() for _ in range(servers + 1)]
    hosts = [build_host(pair) for pair in pairs]
    nodes = [RecordDHT(host, pair, server=i < servers, timeout=timeout) for i, (host, pair) in enumerate(zip(hosts, pairs))]
    async with contextlib.AsyncExitStack() as stack:
        for host, node in zip(hosts, nodes):
            await stack.enter_async_context(host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            await stack.enter_async_context(node.running())
        for host in hosts[:servers]:
            await hosts[-1].connect(PeerInfo(host.get_id(), host.get_addrs()))
            if servers > 1:
                await nodes[-1].add_peer(host.get_id())
        yield nodes[:servers], nodes[-1], pairs[-1]


@contextlib.asynccontextmanager
async def server_and_client(timeout: float = 5.0):
    async with servers_and_client(1, timeout) as (servers, client, client_pair):
        yield servers[0], client, client_pair


def get_value(key: str = KEY) -> bytes:
    payload = Message(type=Message.MessageType.GET_VALUE, key=key.encode()).SerializeToString()
    return varint.encode(len(payload)) + payload


async def read_to_end(stream) -> bytes:
    data = b""
    with contextlib.suppress(StreamEOF, StreamReset):
        while chunk := await stream.read(1024):
            data += chunk
    return data


async def test_messages_to_a_node_share_one_stream_and_survive_the_node_closing_it():
    async with server_and_client() as (server, client, key_pair):
        target = server.host.get_id()
        with trio.fail_after(20):
            assert (await client._get_from(target, KEY.encode()))[1]
            opened = client.streams.opened  # (its own lookups at the start may have opened one too)
            for _ in range(3):
                bundle = encode_bundle([sign_entry(KEY, key_pair, {"n": 1}, 60)])
                assert await client._put_at(target, KEY.encode(), make_signed_put_record(KEY.encode(), bundle,
                                                                                         key_pair.private_key))
                record, answered = await client._get_from(target, KEY.encode())
                assert answered and record is not None
            assert await client._find_node(target, b"/legion/default/test/other") == []  # it knows no one else
            assert client.streams.opened == opened and len(server.inbound) == opened

            # a stream's first answer carries the node's signed peer record, the next ones not
            await client.streams.aclose()
            answers = [await client.streams.request(target, Message(type=Message.MessageType.GET_VALUE,
                                                                    key=KEY.encode())) for _ in range(2)]
            assert answers[0].senderRecord and not answers[1].senderRecord
            assert answers[0].record == answers[1].record and answers[1].record.value

            server.serve_idle_seconds = 0.2  # the node closes the next stream once idle this long
            await client.streams.aclose()
            assert (await client._get_from(target, KEY.encode()))[1]
            await trio.sleep(1)
            record, answered = await client._get_from(target, KEY.encode())  # the kept stream is closed: a new one
            assert answered and record is not None
            assert client.streams.opened == opened + 3


async def test_a_peer_holds_open_at_most_its_cap_of_streams(caplog):
    caplog.set_level(logging.INFO, logger="dht.node")
    async with server_and_client(timeout=1.0) as (server, client, _):
        server.inbound.per_peer = 3
        target = server.host.get_id()
        with trio.fail_after(20):
            idle = []
            for _ in range(3):  # each answered once, then waiting for its next message
                stream = await client.host.new_stream(target, [PROTOCOL_ID])
                await stream.write(get_value())
                assert await stream.read(1)
                idle.append(stream)
            await trio.sleep(0.2)  # the answers' rest is read
            # a fourth is served: the longest idle of the three is closed for it
            assert (await client._get_from(target, KEY.encode()))[1]
            assert len(server.inbound) == 3
            assert await read_to_end(idle[0])  # the rest of its answer, then its end
            # three streams in the middle of a message (none idle): a fifth is refused
            busy = []
            await client.streams.aclose()
            for stream in idle[1:]:
                with contextlib.suppress(Exception):
                    await stream.close()
            await trio.sleep(0.2)
            for _ in range(3):
                stream = await client.host.new_stream(target, [PROTOCOL_ID])
                await stream.write(b"\x80")  # the first byte of a length that never ends
                busy.append(stream)
            await trio.sleep(0.2)
            assert len(server.inbound) == 3
            try:  # reset by the node, as it opens or after
                refused = await client.host.new_stream(target, [PROTOCOL_ID])
                with contextlib.suppress(Exception):
                    await refused.write(get_value())
                assert await read_to_end(refused) == b""
            except StreamFailure:
                pass
            # the three run out of their message's time (2 x timeout) and are cut; then all is served
            await trio.sleep(2.5)
            assert len(server.inbound) == 0
            assert (await client._get_from(target, KEY.encode()))[1]
    assert "refused a DHT stream" in caplog.text


async def test_an_answers_length_goes_out_with_it_and_other_writes_pass_unchanged():
    class Inner:
        muxed_conn = type("Conn", (), {"peer_id": "someone"})()

        def __init__(self):
            self.written = []

        async def write(self, data):
            self.written.append(data)

        async def read(self, n=None):
            return b"\x01"

    inner = Inner()
    served = ServedStream(inner, first_message_seconds=5, message_seconds=5)
    answer = Message(type=Message.MessageType.GET_VALUE, key=b"k", senderRecord=b"record").SerializeToString()
    for body in (answer, answer, b"not an answer"):
        await served.read(1)  # a request begins
        await served.write(varint.encode(len(body)))
        await served.write(body)
    first, second, other = inner.written
    assert first == varint.encode(len(answer)) + answer  # one write; the record the first time
    stripped = Message()
    stripped.ParseFromString(second[1:])
    assert second[0] == len(second) - 1 and stripped.key == b"k" and not stripped.senderRecord
    assert other == varint.encode(13) + b"not an answer"


async def test_a_key_read_again_brings_only_the_entries_its_reader_lacks():
    """A seeker rereads its matchmaking key every second or two; its replicas sent the whole
    bundle each time, then (until 2026-12-07) every entry named both ways. A first read names what
    the reader holds, and the replica names back those it holds too and sends the rest; a
    reread sends only the replica's last token, and the replica answers with what it dropped and
    gained since. Either way the read finds what a full one would."""
    async with servers_and_client(3) as (servers, client, client_pair):
        server = servers[0]
        writers = [create_new_key_pair() for _ in range(4)]

        stored = {}  # writer -> its last entry's bundle

        def put(bundle, at=servers):
            for node in at:
                node.kad.value_store.put_record(KEY.encode(), Record(key=KEY.encode(), value=bundle))

        def store(pair, value):
            stored[id(pair)] = encode_bundle([sign_entry(KEY, pair, value, 60)])
            put(stored[id(pair)])

        answers = []  # (entries sent, digests named, an answer to a token) of each replica answer decoded
        requests = []  # the bytes of each read's request
        request = client.streams.request
        slow, asked_at = set(), []  # replicas that answer after 2.5 s, and when each was asked

        async def counting(peer, message):
            if peer in slow:
                asked_at.append(trio.current_time())
                await trio.sleep(2.5)
            answer = await request(peer, message)
            if message.type == Message.MessageType.GET_VALUE and answer.HasField("record"):
                decoded = decode_answer(KEY, answer.record.value)
                answers.append((len(decoded.entries), len(decoded.named), decoded.since))
                requests.append(len(message.record.value))
            return answer

        client.streams.request = counting
        for i, pair in enumerate(writers[:3]):
            store(pair, {"n": i})
        store(client_pair, {"n": "own"})
        with trio.fail_after(20):
            # a first read: one replica's bundle, then the others' deltas against it
            assert len(await client.get(KEY, every_replica=True)) == 4
            assert answers == [(4, 0, False), (0, 4, False), (0, 4, False)]
            store(writers[3], {"n": 3})
            store(writers[0], {"n": "newer"})
            answers.clear()
            requests.clear()
            read = await client.get(KEY, every_replica=True)
            # the new entry and the newer one sent, the older one named as dropped; a request is a token
            assert answers == [(2, 1, True)] * 3 and max(requests) <= 32
            assert {e.value["n"] for e in read.values()} == {"newer", 1, 2, 3, "own"}
            answers.clear()
            assert len(await client.get(KEY, every_replica=True)) == 5 and answers == [(0, 0, True)] * 3
            # an entry gone from every replica (nodes that restarted, say) is gone from the read too
            for node in servers:
                node.kad.value_store.remove(KEY.encode())
            for pair in writers[1:]:
                put(stored[id(pair)])
            answers.clear()
            read = await client.get(KEY, every_replica=True)
            assert answers == [(0, 2, True)] * 3 and {e.value["n"] for e in read.values()} == {1, 2, 3}
            # a replica that no longer knows the token (it restarted, or forgot it beyond its caps)
            # answers against the entries named, none: everything
            for node in servers:
                node.told.__init__()  # (its streams hold it: emptied in place)
            answers.clear()
            assert {e.value["n"] for e in (await client.get(KEY, every_replica=True)).values()} == {1, 2, 3}
            assert answers == [(3, 0, False)] * 3
            # a reader with nothing in common with the replicas: where the first asked is slow to
            # answer, the others are asked too, after FIRST_ANSWER_SECONDS, and all send everything
            client.seen = SeenEntries()
            answers.clear()
            slow.update(node.host.get_id() for node in servers)
            assert len(await client.get(KEY, every_replica=True)) == 3 and answers == [(3, 0, False)] * 3
            assert len(asked_at) == 3 and all(t - asked_at[0] >= FIRST_ANSWER_SECONDS for t in asked_at[1:])
            slow.clear()
            # a node of an earlier version ignores the request and answers with its bundle; so does
            # a node sent a malformed one
            for malformed in (b"", b"legion-known-v1:" + b"x" * 8, b"legion-read-v2:" + b"x" * 7,
                              b"legion-read-v2:" + msgpack.packb([b"short", b""]),
                              b"legion-read-v2:" + msgpack.packb([b"", b"x" * 7]),
                              b"legion-read-v2:" + msgpack.packb([b"", b"x" * 8 * (MAX_KNOWN + 1)]), b"garbage"):
                record, _ = await client._get_from(server.host.get_id(), KEY.encode(), malformed)
                assert len(decode_bundle_strict(KEY, record.value)) == 3
            # every entry named: an answer of digests only, still one that holds the key
            record, answered = await client._get_from(server.host.get_id(), KEY.encode(),
                                                      encode_read(b"", decode_bundle_strict(KEY, record.value)))
            decoded = decode_answer(KEY, record.value)
            assert answered and (len(decoded.entries), len(decoded.named)) == (0, 3)


def test_what_a_node_told_its_readers_is_capped_per_reader_and_in_all():
    told = ToldReaders(max_reads=4, max_digests=10, per_reader=2)
    digests = frozenset(bytes([i]) * 8 for i in range(4))
    told.remember("a", b"k1", b"t1", digests)
    told.remember("a", b"k2", b"t2", digests)
    told.remember("a", b"k3", b"t3", digests)  # a third key of one reader: its oldest goes
    assert told.since("a", b"k1", b"t1") is None and told.since("a", b"k3", b"t3") == digests
    assert told.since("a", b"k3", b"other") is None  # another token: not what was told with it
    told.remember("b", b"k1", b"t4", digests)  # 12 digests in all, over 10: the least recently used goes
    assert told.since("a", b"k2", b"t2") is None and len(told) == 2
    told.remember("c", b"k1", b"t5", frozenset(bytes([i]) * 8 for i in range(11)))  # more than all: not kept
    assert told.since("c", b"k1", b"t5") is None and len(told) == 2
    # readers told the same entries of a key share one set of digests (625 owners of a cell key)
    told.remember("d", b"k1", b"t6", frozenset(digests))
    assert told.since("d", b"k1", b"t6") is told.since("b", b"k1", b"t4")


def test_remembered_reads_are_capped_and_forget_the_least_recently_read_key():
    pair = create_new_key_pair()
    entries = [sign_entry(KEY, create_new_key_pair(), {"n": i}, 60) for i in range(6)]
    seen = SeenEntries(max_keys=2, max_entries=4)
    seen.remember(b"a", entries[:2])
    seen.remember(b"b", entries[2:3])
    seen.remember(b"c", entries[3:4])  # a third key: the one read longest ago goes
    assert seen.get(b"a") == [] and seen.get(b"b") == entries[2:3] and len(seen) == 2
    seen.remember(b"d", entries[:4])  # four more entries than the cap leaves room for: the others go
    assert seen.get(b"b") == seen.get(b"c") == [] and len(seen.get(b"d")) == 4 and len(seen) == 4
    seen.remember(b"e", entries)  # more than the cap alone: not remembered
    assert seen.get(b"e") == [] and len(seen) == 4
    expired = sign_entry(KEY, pair, {"n": 0}, 60, now=time.time() - 120)
    seen.remember(b"d", [expired])
    assert seen.get(b"d") == []


async def test_a_key_left_with_no_usable_cached_node_is_looked_up_again(autojump_clock):
    """A home peer knows two nodes of the run board's key: the seed, and another home peer it
    cannot dial. The seed failed one write (two writes of the same entry raced), was dropped from
    the key's set, and for a minute the peer read and wrote the board only locally: it saw nobody
    join and waited after the others had finished (an intermittent CI failure)."""
    pair = create_new_key_pair()
    node = RecordDHT(build_host(pair), pair, server=False)
    seed, home = (build_host(create_new_key_pair()).get_id() for _ in range(2))
    lookups = []

    async def find_closest_peers_network(key: bytes) -> list:
        lookups.append(key)
        return [seed, home]

    node.kad.peer_routing.find_closest_peers_network = find_closest_peers_network
    node.routing_table_size = lambda: 2
    node._unreachable[home] = trio.current_time() + 1e6
    assert await node._closest_peers(b"/legion/k") == [seed] and len(lookups) == 1
    node._forget(b"/legion/k", seed)
    # the failed node may be back soon (a healed partition): the set is looked up again within a minute
    assert node._lookups[b"/legion/k"].expiry <= trio.current_time() + FORGOTTEN_LOOKUP_SECONDS
    await trio.sleep(UNUSABLE_LOOKUP_SECONDS)
    assert await node._closest_peers(b"/legion/k") == [seed] and len(lookups) == 2
    # where the lookup finds no usable node either, the next is not at once
    node._forget(b"/legion/k", seed)
    node._unreachable[seed] = trio.current_time() + 1e6
    await trio.sleep(UNUSABLE_LOOKUP_SECONDS)
    assert await node._closest_peers(b"/legion/k") == [] and len(lookups) == 3
    assert await node._closest_peers(b"/legion/k") == [] and len(lookups) == 3
    await trio.sleep(UNUSABLE_LOOKUP_SECONDS)
    assert await node._closest_peers(b"/legion/k") == [] and len(lookups) == 4


async def test_a_lookup_that_found_enough_nodes_is_kept_though_one_cannot_be_used(autojump_clock):
    """Nodes a lookup found that this peer cannot use (one it could not dial lately) are found again
    by the next lookup: counted as missing, most keys of 64 peers were looked up every 5 s."""
    pair = create_new_key_pair()
    node = RecordDHT(build_host(pair), pair, server=False)
    nodes = [build_host(create_new_key_pair()).get_id() for _ in range(node.replication)]
    lookups = []

    async def find_closest_peers_network(key: bytes) -> list:
        lookups.append(key)
        return list(nodes)

    node.kad.peer_routing.find_closest_peers_network = find_closest_peers_network
    node.routing_table_size = lambda: 2 * node.replication
    node._unreachable[nodes[0]] = trio.current_time() + 1e6
    first = await node._closest_peers(b"/legion/k")
    assert len(first) == node.replication - 1 and nodes[0] not in first
    await trio.sleep(60)
    assert await node._closest_peers(b"/legion/k") == first and len(lookups) == 1
    # a node left out as undialable that has connected since is used at once, without a lookup
    # (peers starting together on a loaded machine: a dial timed out, the other side's succeeded)
    node.host.get_network().connections[nodes[0]] = []
    assert nodes[0] in await node._closest_peers(b"/legion/k") and len(lookups) == 1
    del node.host.get_network().connections[nodes[0]]
    node.look_up_again()  # a view that may be stale (a healed partition): looked up at the next use
    await node._closest_peers(b"/legion/k")
    assert len(lookups) == 2
    # ... until that node may be dialled again: then it is looked up again, and the node is back
    node._unreachable[nodes[1]] = trio.current_time() + 30
    lookups.clear()
    await node._closest_peers(b"/legion/k2")
    await trio.sleep(20)
    await node._closest_peers(b"/legion/k2")
    assert len(lookups) == 1
    await trio.sleep(11)
    assert nodes[1] in await node._closest_peers(b"/legion/k2") and len(lookups) == 2
    # a lookup that found fewer nodes than the factor and the table is looked up again soon
    lookups.clear()
    nodes[:] = nodes[:3]
    await node._closest_peers(b"/legion/other")
    await trio.sleep(6)
    await node._closest_peers(b"/legion/other")
    assert len(lookups) == 2
    # one that timed out (a loaded machine) is not tried again at once: that adds to the load
    lookups.clear()

    async def hung(key: bytes) -> list:
        lookups.append(key)
        await trio.sleep_forever()

    node.kad.peer_routing.find_closest_peers_network = hung
    await node._closest_peers(b"/legion/third")
    await trio.sleep(TIMED_OUT_LOOKUP_SECONDS - node.timeout - 1)
    await node._closest_peers(b"/legion/third")
    assert len(lookups) == 1


def test_a_replica_cannot_make_the_readers_view_of_it_hold_more_than_the_reader_read():
    """A replica's answer names entries it holds among those the reader named; one naming others
    (100 made-up digests) leaves the reader's view of it with the entries it read only, and an
    answer to a token the reader did not send is dropped."""
    entries = [sign_entry(KEY, create_new_key_pair(), {"n": i}, 60) for i in range(2)]
    seen = {digest(entries[0]): entries[0]}
    junk = b"".join(bytes([i]) * 8 for i in range(100))

    def answer(since: bool) -> bytes:
        return b"legion-read-v2:" + msgpack.packb([b"t" * 8, since, junk + digest(entries[0]), [entries[1].to_wire()]],
                                                  use_bin_type=True)

    read, view = RecordDHT._decode(KEY, answer(False), "replica", seen, None)
    assert sorted(e.value["n"] for e in read) == [0, 1]
    assert view == (b"t" * 8, frozenset({digest(entries[0]), digest(entries[1])}))
    assert RecordDHT._decode(KEY, answer(True), "replica", seen, None) == ([], None)
