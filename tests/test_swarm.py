"""A swarm of real peer processes on 127.0.0.1: discovery and failure detection."""

from contextlib import asynccontextmanager
from functools import partial

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from bootstrap.join import connect_bootstrap_peers
from conftest import HEARTBEAT
from dht import RecordDHT
from swarm.local import status_json
from swarm.members import live_members
from swarm.network import build_host
from swarm.peer import Peer, PeerConfig

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@asynccontextmanager
async def dht_client(bootstrap: str):
    """A DHT client joined through ``bootstrap`` that can read the member list many times a second."""
    key_pair = create_new_key_pair()
    host = build_host(key_pair)
    dht = RecordDHT(host, key_pair, server=False)
    async with host.run([]), dht.running():
        for peer_id in await connect_bootstrap_peers(host, [bootstrap], timeout=5):
            await dht.add_peer(peer_id)
        yield dht


async def seconds_until(dht, predicate, timeout):
    started = trio.current_time()
    while not predicate({m.peer_id for m in (await live_members(dht, "default")).entries}):
        if trio.current_time() - started > timeout:
            return None
        await trio.sleep(0.05)
    return trio.current_time() - started


@pytest.mark.slow  # ~20 s; peers forming a swarm: every multi-process test, a killed peer noticed: the chaos test
async def test_thirteen_peers_in_four_processes_see_each_other_and_notice_a_kill(seed, spawn):
    groups = [await trio.to_thread.run_sync(
        lambda: spawn(["--bootstrap", seed.addrs[0], "--listen", "/ip4/127.0.0.1/tcp/0"], count=4))
        for _ in range(3)]
    everyone = set(seed.peer_ids).union(*(g.peer_ids for g in groups))
    assert len(everyone) == 13

    async with dht_client(groups[0].addrs[0]) as view_a, dht_client(groups[2].addrs[-1]) as view_b:
        waited = await seconds_until(view_a, lambda ids: ids == everyone, timeout=15)
        assert waited is not None, "not all 13 peers visible"

        # The CLI's view through a peer of every process converges on the whole swarm, with sane fields.
        for group in groups:
            for _ in range(5):
                listed = await trio.to_thread.run_sync(status_json, group.addrs[-1])
                if {p["peer_id"] for p in listed} == everyone:
                    break
            assert {p["peer_id"] for p in listed} == everyone
            for entry in listed:
                assert entry["role"] == ("seed" if entry["peer_id"] in seed.peer_ids else "peer")
                assert entry["addrs"] and all("/p2p/" + entry["peer_id"] in a for a in entry["addrs"])
                assert entry["cpu_cores"] >= 1 and entry["ram_bytes"] > 0 and entry["uptime_seconds"] >= 0

        victim = groups[1]
        survivors = everyone - set(victim.peer_ids)
        detection = {}

        async def watch(name, view):
            detection[name] = await seconds_until(view, lambda ids: ids == survivors, timeout=6 * HEARTBEAT)

        victim.kill()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, "a", view_a)
            nursery.start_soon(watch, "b", view_b)
    for name, seconds in detection.items():
        assert seconds is not None and seconds <= 3 * HEARTBEAT, f"view {name}: killed peers listed for {seconds}s"


async def seed_peer_and_home(nursery) -> tuple[Peer, Peer, Peer]:
    """A seed (which relays), a peer, and a home peer told by its dial-backs that it is private,
    returned once it holds a slot on the seed's relay."""
    seed = await nursery.start(Peer(PeerConfig(listen=LOOPBACK, seed=True, heartbeat=1)).run)
    other = await nursery.start(Peer(PeerConfig(listen=LOOPBACK, bootstrap=[str(seed.addrs[0])], heartbeat=1)).run)
    home = Peer(PeerConfig(listen=LOOPBACK, bootstrap=[str(seed.addrs[0])], heartbeat=1))

    async def private():
        home.reachability.status = "private"
        return "private"

    home.reachability.check = private
    await nursery.start(home.run)
    with trio.fail_after(20):
        while home.reach != "relayed":
            await trio.sleep(0.1)
    return seed, other, home


async def test_a_peer_others_cannot_dial_uses_the_dht_as_a_client_and_is_reached_through_a_relay():
    """What a peer behind NAT does (``Peer._check_reachability``, here with the dial-backs'
    verdict given): it never serves the DHT, so servers leave it out of their requests, yet its
    records reach them; it reserves a slot on the seed's relay and advertises the circuit, and a
    peer that cannot dial it directly reaches it through the relay, which counts the bytes."""
    from libp2p.kad_dht.kad_dht import PROTOCOL_ID
    from libp2p.peer.peerinfo import PeerInfo
    from swarm.relay import Relays

    async with trio.open_nursery() as nursery:
        seed, server, home = await seed_peer_and_home(nursery)
        with trio.fail_after(20):
            while not server.dht.server:
                await trio.sleep(0.1)
        assert not home.dht.server and PROTOCOL_ID not in home.host.get_mux().handlers
        assert seed.dht._may_serve(server.peer_id) and not seed.dht._may_serve(home.peer_id)
        key = "/legion/default/test/client"
        assert await home.dht.store(key, {"from": "home"}, 30) >= 1
        assert await server.dht.store(key, {"from": "server"}, 30) >= 1
        for reader in (seed, home):
            entries = await reader.dht.get(key)
            assert {e.value["from"] for e in entries.values()} == {"home", "server"}
        # a newcomer that knows the home peer only by its addresses: direct ones fail, the circuit works
        circuit = home.relays.addrs
        assert circuit and str(circuit[0]) == f"{seed.addrs[0]}/p2p-circuit/p2p/{home.peer_id}"
        assert str(circuit[0]) in home.announcement().addrs
        host = build_host(create_new_key_pair())
        relays = Relays(host, serve=False)
        async with host.run([multiaddr.Multiaddr(a) for a in LOOPBACK]):
            await nursery.start(relays.run)
            await host.connect(PeerInfo(seed.peer_id, seed.addrs))
            host.get_peerstore().add_addrs(home.peer_id, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/9"), *circuit], 60)
            before = seed.relays.relayed_bytes
            with trio.fail_after(20):
                stream = await host.new_stream(home.peer_id, ["/ipfs/ping/1.0.0"])
                await stream.write(bytes(range(32)))
                assert await stream.read(32) == bytes(range(32))
            await stream.close()
            assert relays.relayed_dials == 1
            # the relay counts what it carried: the handshakes and the ping, each way
            assert seed.relays.relayed_bytes - before >= 64 and relays.relayed_bytes == 0
        nursery.cancel_scope.cancel()


async def test_one_circuit_through_a_relay_ending_leaves_the_others_to_the_same_peer_open():
    """py-libp2p's relay closed the latest other circuit of a peer when one of its circuits ended:
    every relayed connection of a home peer broke at once (seen in bench/internet.py as all-reduce
    streams failing together mid-round)."""
    from libp2p.peer.peerinfo import PeerInfo
    from swarm.relay import Relays

    async with trio.open_nursery() as nursery:
        seed, _, home = await seed_peer_and_home(nursery)
        dialers = [build_host(create_new_key_pair()) for _ in range(2)]
        listen = [multiaddr.Multiaddr(a) for a in LOOPBACK]
        async with dialers[0].run(listen), dialers[1].run(listen):
            streams = []
            for host in dialers:  # each reaches the home peer through the seed's relay
                relays = Relays(host, serve=False)
                await nursery.start(relays.run)
                await host.connect(PeerInfo(seed.peer_id, seed.addrs))
                host.get_peerstore().add_addrs(home.peer_id, home.relays.addrs, 60)
                with trio.fail_after(20):
                    streams.append(await host.new_stream(home.peer_id, ["/ipfs/ping/1.0.0"]))
                assert relays.relayed_dials == 1
            await dialers[0].disconnect(home.peer_id)  # the first circuit ends
            await trio.sleep(1)
            with trio.fail_after(10):
                await streams[1].write(bytes(range(32)))
                assert await streams[1].read(32) == bytes(range(32))
        nursery.cancel_scope.cancel()


async def test_a_peer_behind_nat_connects_ahead_to_the_peers_it_will_average_with():
    """A peer others cannot dial connects to the run's peers before its first round (addresses
    from the member list), and names those it could not reach; a public peer leaves that to
    the rounds."""
    from libp2p.peer.id import ID

    async with trio.open_nursery() as nursery:
        seed, other, home = await seed_peer_and_home(nursery)
        await home.host.disconnect(other.peer_id)
        assert not home.host.get_network().get_connections(other.peer_id)
        stranger = ID.from_pubkey(create_new_key_pair().public_key).to_base58()  # in no member list
        with trio.fail_after(30):
            unreached = await home.connect_ahead([other.peer_id.to_base58(), stranger])
        assert unreached == [stranger] and home.host.get_network().get_connections(other.peer_id)
        seed.reachability.status = "public"  # as others' dial-backs would find
        assert await seed.connect_ahead([stranger]) == []  # a public peer does not try
        nursery.cancel_scope.cancel()


async def test_a_peer_known_only_by_id_is_looked_up_before_a_stream_to_it():
    """A checkpoint's holders (from the holdings), donors (from the board) and shard owners (from
    the bids) come as ids; py-libp2p dials only addresses its peerstore holds, learnt as a side
    effect of DHT answers, which in a large swarm miss most peers. The address is looked up."""
    from peer_helpers import start_peers

    async with trio.open_nursery() as nursery:
        seed, dialer, target = await start_peers(nursery, 3)
        with trio.fail_after(30):
            while not target.dht.server:
                await trio.sleep(0.2)
        answered = trio.Event()

        async def answer(stream):
            await stream.write(b"here")
            answered.set()
            await stream.close()

        target.host.set_stream_handler("/legion/test/hello/1.0.0", answer)
        with trio.fail_after(10):
            while dialer.host.get_network().get_connections(target.peer_id):
                await dialer.host.disconnect(target.peer_id)
                await trio.sleep(0.1)
        dialer.host.get_peerstore().clear_addrs(target.peer_id)  # as if it had never heard where the target is
        with trio.fail_after(20):
            stream = await dialer.host.new_stream(target.peer_id, ["/legion/test/hello/1.0.0"])
            assert await stream.read(4) == b"here"
        assert answered.is_set()
        nursery.cancel_scope.cancel()


async def test_a_lookup_skips_a_peer_it_could_not_dial_for_a_while():
    """A peer behind NAT that a lookup learns of (from its peerstore or another node's answer)
    stalled every lookup for a dial timeout; heartbeat refreshes gave up and peers' entries expired.
    Here the undialable peer is a port that accepts and never speaks."""
    from libp2p.peer.id import ID

    accepted = 0

    async def silent(stream):
        nonlocal accepted
        accepted += 1
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        seed = await nursery.start(Peer(PeerConfig(listen=LOOPBACK, seed=True, heartbeat=1)).run)
        async with dht_client(str(seed.addrs[0])) as client:
            client.timeout = 2.0
            silent_peer = ID.from_pubkey(create_new_key_pair().public_key)
            client.host.get_peerstore().add_addrs(silent_peer, [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")], 600)
            assert await client.store("/legion/default/test/first", 1, 30) == 1
            assert accepted == 1
            assert await client.store("/legion/default/test/second", 2, 30) == 1
            assert accepted == 1  # not dialled again
            assert set(await seed.dht.get("/legion/default/test/second")) == {client.host.get_id().to_base58()}
        nursery.cancel_scope.cancel()


async def test_dial_backs_speak_autonat_v1_and_refuse_forged_or_malformed_requests():
    """Reachability is AutoNAT v1 (go-libp2p's peers ask and answer the same messages): a peer
    listening on a reachable port is dialled back and told OK; a request naming another peer id,
    or bytes that are no message, get an error reply, and the server goes on serving."""
    from libp2p.host.autonat.pb.autonat_pb2 import Message
    from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

    from swarm.reachability import PROTOCOL, PUBLIC

    async with trio.open_nursery() as nursery:
        server = await nursery.start(Peer(PeerConfig(listen=["/ip4/127.0.0.1/tcp/0"], seed=True, heartbeat=1)).run)
        asker = await nursery.start(Peer(PeerConfig(listen=["/ip4/127.0.0.1/tcp/0"], heartbeat=1,
                                                    bootstrap=[str(server.addrs[0])])).run)

        async def ask(payload: bytes) -> Message:
            stream = await asker.host.new_stream(server.peer_id, [PROTOCOL])
            await stream.write(encode_varint_prefixed(payload))
            reply = Message.FromString(await read_varint_prefixed_bytes_limited(stream, 8192))
            await stream.close()
            return reply

        forged = Message(type=Message.DIAL)
        forged.dial.peer.id = server.peer_id.to_bytes()  # not the asker
        forged.dial.peer.addrs.append(asker.addrs[0].to_bytes())
        with trio.fail_after(20):
            assert (await ask(forged.SerializeToString())).dialResponse.status == Message.E_DIAL_REFUSED
            assert (await ask(b"\xff\xff not a protobuf")).dialResponse.status == Message.E_BAD_REQUEST
            assert await asker.reachability.check() == PUBLIC  # its port on 127.0.0.1 was reached
        nursery.cancel_scope.cancel()
