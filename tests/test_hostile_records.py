"""Bad records sent over the real Kademlia protocol to a real peer process are dropped, and the
peer keeps serving. Also: a record outlives its writer until it expires."""

import contextlib
import time

import msgpack
import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.records.record import make_signed_put_record

from dht import RecordDHT
from dht.streams import MAX_INBOUND_PER_PEER
from dht.records import encode_bundle, sign_entry
from swarm.local import status_json
from swarm.members import members_key
from swarm.network import build_host

KEY = members_key("default")


def signed_record(bundle: bytes, key_pair):
    return make_signed_put_record(KEY.encode(), bundle, key_pair.private_key)


async def test_forged_expired_oversized_and_malformed_records_are_dropped(seed):
    kp = create_new_key_pair()
    host = build_host(kp)
    dht = RecordDHT(host, kp, server=False, timeout=5)
    target = info_from_p2p_addr(multiaddr.Multiaddr(seed.addrs[0]))
    victim = create_new_key_pair()

    forged = msgpack.unpackb(encode_bundle([sign_entry(KEY, kp, {"evil": 1}, ttl=30)]))
    forged[0][0] = ID.from_pubkey(victim.public_key).to_bytes()
    unsigned = msgpack.unpackb(encode_bundle([sign_entry(KEY, kp, {"evil": 2}, ttl=30)]))
    unsigned[0][4] = b""
    bad_bundles = {
        "forged": msgpack.packb(forged),
        "unsigned": msgpack.packb(unsigned),
        "expired": encode_bundle([sign_entry(KEY, kp, {"evil": 3}, ttl=1, now=time.time() - 60)]),
        "oversized": msgpack.packb([[b"x" * 60_000, b"y", 0.0, 1.0, b"z"]] * 10),
        "malformed": b"\xde\xad\xbe\xef" * 10,
    }
    async with host.run([]), dht.running():
        await host.connect(target)
        store = dht.kad.value_store
        for name, bundle in bad_bundles.items():
            with trio.fail_after(10):
                accepted = await store._store_at_peer(target.peer_id, KEY.encode(), bundle,
                                                      record=signed_record(bundle, kp))
            assert not accepted, f"{name} record was accepted"

        # Raw garbage on the Kademlia protocol: a huge varint length, then junk.
        stream = await host.new_stream(target.peer_id, [KAD_PROTOCOL])
        await stream.write(b"\xff\xff\xff\xff\x0f" + b"junk" * 100)
        await stream.close()

        # An honest record through the same connection is still stored.
        good = encode_bundle([sign_entry(KEY, kp, {"addrs": []}, ttl=30)])
        with trio.fail_after(10):
            assert await store._store_at_peer(target.peer_id, KEY.encode(), good, record=signed_record(good, kp))

    # The seed is alive and lists itself only: the honest entry is not a valid announcement (dropped
    # and logged by the reader), none of the bad ones got in.
    assert seed.proc.poll() is None
    listed = await trio.to_thread.run_sync(status_json, seed.addrs[0])
    assert [p["peer_id"] for p in listed] == seed.peer_ids
    log = seed.log_tail(200)
    assert "Traceback" not in log


def test_an_entry_outlives_a_killed_writer_and_is_withdrawn_by_a_stopped_one(seed, spawn):
    slow = ["--bootstrap", seed.addrs[0], "--heartbeat", "8"]  # entries live 20 s
    killed, stopped = spawn(slow), spawn(slow)
    killed.kill()
    assert stopped.terminate() == 0
    listed = {p["peer_id"] for p in status_json(seed.addrs[0])}
    assert killed.peer_ids[0] in listed, "a killed peer's entry must live on at the seed until it expires"
    assert stopped.peer_ids[0] not in listed, "a peer that shut down cleanly withdraws its entry"
    assert "Traceback" not in stopped.log_tail(200)


async def test_silent_dht_streams_are_cut_and_the_peer_keeps_serving(seed):
    kp = create_new_key_pair()
    host = build_host(kp)
    target = info_from_p2p_addr(multiaddr.Multiaddr(seed.addrs[0]))
    async with host.run([]):
        await host.connect(target)
        # More streams that never speak than the seed serves from one peer: the seed keeps at most
        # MAX_INBOUND_PER_PEER of them, ending the longest idle for each new one, and cuts the
        # rest once their first message is overdue.
        silent = []
        for _ in range(MAX_INBOUND_PER_PEER + 4):
            with contextlib.suppress(Exception):
                silent.append(await host.new_stream(target.peer_id, [KAD_PROTOCOL]))
        assert len(silent) == MAX_INBOUND_PER_PEER + 4
        with trio.fail_after(20):
            for stream in silent:
                with contextlib.suppress(Exception):
                    assert await stream.read(1) == b""  # closed or reset by the seed
    # The seed answers DHT reads.
    listed = await trio.to_thread.run_sync(status_json, seed.addrs[0])
    assert [p["peer_id"] for p in listed] == seed.peer_ids
    assert "that sent nothing" in seed.log_tail(200)
