"""A swarm of real peer processes on 127.0.0.1: discovery and failure detection."""

import time
from contextlib import asynccontextmanager

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from bootstrap.join import connect_bootstrap_peers
from conftest import HEARTBEAT
from dht import RecordDHT
from swarm.local import status_json
from swarm.members import live_members
from swarm.network import build_host


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
    while not predicate({m.peer_id for m in await live_members(dht, "default")}):
        if trio.current_time() - started > timeout:
            return None
        await trio.sleep(0.05)
    return trio.current_time() - started


async def test_thirteen_peers_in_four_processes_see_each_other_and_notice_a_kill(seed, spawn):
    started = time.monotonic()
    groups = [await trio.to_thread.run_sync(
        lambda: spawn(["--bootstrap", seed.addrs[0], "--listen", "/ip4/127.0.0.1/tcp/0"], count=4))
        for _ in range(3)]
    everyone = set(seed.peer_ids).union(*(g.peer_ids for g in groups))
    assert len(everyone) == 13

    async with dht_client(groups[0].addrs[0]) as view_a, dht_client(groups[2].addrs[-1]) as view_b:
        waited = await seconds_until(view_a, lambda ids: ids == everyone, timeout=15)
        assert waited is not None, "not all 13 peers visible"
        assert time.monotonic() - started < 15, "the swarm took longer than 15 s to form"

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
