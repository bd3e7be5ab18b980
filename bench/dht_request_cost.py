"""What one DHT request costs on the wire besides the entries it carries, measured.

``python bench/dht_request_cost.py [--requests 200] [--servers 24] [--json]`` starts DHT servers
and a client in this process (``dht.RecordDHT`` over ``swarm.network.build_host``: TCP, Noise,
yamux, on 127.0.0.1), the first server knowing the others, and counts the loopback interface's
bytes (TCP/IP headers included) over repeated messages of the client to that server: a read of a
key it holds no entry under, a read of a key holding one entry, a write of one entry (which the
server echoes), a FIND_NODE query of a lookup, and a read of a key holding 16 entries, in full,
again as a delta that names all 16 (``dht.records.encode_read`` without a token: the reread
answered with none of them, their digests named back; the digests it names are counted as its
entries), and again with the token of the replica's last answer only (since 2026-12-07: the
replica answers with what changed since, here nothing). What remains after the entries' own bytes is
each message's overhead: a stream (multistream negotiation, a yamux stream, its close), Noise
frames and TCP acknowledgements, the signed peer records of request and answer, and up to 20
closer peers an answer lists. Each message is sent once on a new stream (as py-libp2p's client
sends every message), once on a stream kept open (as Legion's client does since 2026-12-06,
``dht.streams``), and each with the server answering as py-libp2p does (each closer peer with its
signed record) and as Legion's servers do since 2026-12-05
(``dht.node.RecordDHT._list_closer_peers``). The scale simulator charges these per message
(``bench/dht_load.py``); before 2026-12-05 it charged none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import multiaddr
import psutil
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.peer.peerinfo import PeerInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dht import RecordDHT  # noqa: E402
from dht.records import decode_answer, encode_bundle, encode_read, entry_bytes, sign_entry  # noqa: E402
from libp2p.records.record import make_signed_put_record  # noqa: E402
from swarm.network import build_host  # noqa: E402

LISTEN = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
VALUE = {"payload": "x" * 200}  # a small entry, about a board entry's size


def loopback_bytes() -> int:
    return psutil.net_io_counters(pernic=True)["lo"].bytes_sent


async def measure(requests: int, servers: int, lean: bool = True) -> dict:
    """Per-message bytes of ``requests`` messages from a client to one server whose routing table
    holds ``servers`` - 1 other servers (a GET_VALUE answer lists up to 20 closer peers). Without
    ``lean``, the server answers as py-libp2p does (every closer peer with its signed record), as
    Legion's did until 2026-12-05."""
    pairs = [create_new_key_pair() for _ in range(servers + 1)]
    hosts = [build_host(pair) for pair in pairs]
    nodes = [RecordDHT(host, pair, server=i < servers) for i, (host, pair) in enumerate(zip(hosts, pairs))]
    if not lean:
        nodes[0].kad._add_closer_peers_to_response = KadDHT._add_closer_peers_to_response.__get__(nodes[0].kad)
    client, target = nodes[-1], hosts[0].get_id()
    results = {}
    async with contextlib.AsyncExitStack() as stack:
        for host, node in zip(hosts, nodes):
            await stack.enter_async_context(host.run([LISTEN]))
            await stack.enter_async_context(node.running())
        for host, node in zip(hosts[1:], nodes[1:]):  # everyone knows the first server, and it the servers
            await host.connect(PeerInfo(target, hosts[0].get_addrs()))
            await node.add_peer(target)
            if node.server:
                hosts[0].get_peerstore().add_addrs(host.get_id(), host.get_addrs(), 3600)
                await nodes[0].add_peer(host.get_id())
        await trio.sleep(1)
        entry = sign_entry("/legion/cost/held", pairs[-1], VALUE, 600)
        record = make_signed_put_record(b"/legion/cost/held", encode_bundle([entry]), pairs[-1].private_key)
        assert await client._put_at(target, b"/legion/cost/held", record)
        many = [sign_entry("/legion/cost/many", create_new_key_pair(), VALUE, 600) for _ in range(16)]
        nodes[0].kad.value_store.put_record(b"/legion/cost/many", Record(key=b"/legion/cost/many", value=encode_bundle(many)))
        known = encode_read(b"", many)
        records = []
        for i in range(2 * requests):  # each write a newer entry, signed beforehand
            fresh = encode_bundle([sign_entry("/legion/cost/held", pairs[-1], VALUE, 600)])
            records.append(make_signed_put_record(b"/legion/cost/held", fresh, pairs[-1].private_key))
        for streams, idle_seconds in (("new_stream", 0.0), ("kept_stream", 60.0)):
            client.streams.idle_seconds = idle_seconds  # 0: each message's stream is closed before the next
            await client.streams.aclose()

            async def per_message(name: str, request, payload: int = 0) -> None:
                before = loopback_bytes()
                for i in range(requests):
                    await request(i)
                await client.streams.close_retired()  # (the streams of a message each)
                results.setdefault(streams, {})[name] = round((loopback_bytes() - before) / requests - payload)

            offset = 0 if idle_seconds == 0 else requests
            await per_message("read_empty_key", lambda i: client._get_from(target, b"/legion/cost/empty"))
            await per_message("read_one_entry", lambda i: client._get_from(target, b"/legion/cost/held"), entry_bytes(entry))
            await per_message("write_one_entry", lambda i: client._put_at(target, b"/legion/cost/held", records[offset + i]),
                              2 * entry_bytes(entry))
            await per_message("find_node", lambda i: client._find_node(target, f"/legion/cost/new/{i}".encode()))
            await per_message("read_16_entries", lambda i: client._get_from(target, b"/legion/cost/many"),
                              sum(map(entry_bytes, many)))
            await per_message("reread_16_known", lambda i: client._get_from(target, b"/legion/cost/many", known), len(known))
            token = [b""]  # the replica's last answer's (the first reread names the 16 entries)

            async def reread_with_token(i: int) -> None:
                record, _ = await client._get_from(target, b"/legion/cost/many", encode_read(token[0], many))
                token[0] = decode_answer("/legion/cost/many", record.value).token

            await per_message("reread_16_token", reread_with_token)
        closer = len(nodes[0].kad.routing_table.find_local_closest_peers(b"/legion/cost/empty", 20))
    return {"requests": requests, "servers": servers, "closer_peers_listed": closer, "lean_answers": lean,
            "overhead_bytes": results["kept_stream"], "new_stream_overhead_bytes": results["new_stream"],
            "entry_bytes": entry_bytes(entry)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--servers", type=int, default=24, help="DHT servers the answering one knows (up to 20 listed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # py-libp2p logs each refused duplicate write
    results = [trio.run(measure, args.requests, args.servers, lean) for lean in (False, True)]
    if args.json:
        print(json.dumps(results))
    for result in [] if args.json else results:
        answers = "Legion's answers" if result["lean_answers"] else "py-libp2p's answers"
        print(answers, "on a new stream each:", result["new_stream_overhead_bytes"])
        print(answers, "on a stream kept open:", result["overhead_bytes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
