"""A peer's connection limits are sized for large swarms (``swarm.network``)."""

import subprocess
import sys
from pathlib import Path

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import PeerInfo

from swarm.network import build_host

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


async def _run(host, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with host.run(listen_addrs=[LOOPBACK]):
        task_status.started()
        await trio.sleep_forever()


async def test_a_peer_keeps_more_connections_than_py_libp2p_allows_by_default():
    """py-libp2p admits 250 inbound connections (300 in all, less 50 kept for its own dials) and
    prunes idle ones above 200; a peer holding DHT keys at 1,000 peers talks to ~650 others a
    minute. 320 peers connect to one: it keeps them all."""
    count = 320
    async with trio.open_nursery() as nursery:
        hub = build_host(create_new_key_pair())
        await nursery.start(_run, hub)
        hub_info = PeerInfo(hub.get_id(), hub.get_addrs())
        hosts = [build_host(create_new_key_pair()) for _ in range(count)]
        for host in hosts:
            await nursery.start(_run, host)
            await host.connect(hub_info)
        await trio.sleep(0.5)
        assert len(hub.get_network().get_connections()) == count
        nursery.cancel_scope.cancel()


async def test_a_peer_does_not_dial_the_peers_it_knows_only_to_have_connections():
    """py-libp2p's auto-connector dials peers from the peerstore while a host has fewer
    connections than the midpoint of its watermarks (448 with Legion's): every peer of a 64-peer
    swarm connected to every other, and no group formed (``bench/matchmaking_swarm.py``). A
    Legion host connects only where it has a message to send."""
    async with trio.open_nursery() as nursery:
        hosts = [build_host(create_new_key_pair()) for _ in range(4)]
        for host in hosts:
            await nursery.start(_run, host)
        me, others = hosts[0], hosts[1:]
        for other in others:
            me.get_peerstore().add_addrs(other.get_id(), other.get_addrs(), 600)
        await me.get_network().auto_connector.maybe_connect()  # what its timer and disconnects call
        await trio.sleep(1)
        assert me.get_network().get_total_connections() == 0
        nursery.cancel_scope.cancel()


def test_the_open_file_limit_is_raised_for_the_connections():
    """A process started with a soft limit of 256 open files (desktops often give 1,024) raises
    it, within the hard limit, before its peers connect."""
    code = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
            "from swarm.network import raise_open_file_limit; "
            "print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    returned, in_force = map(int, out.split())
    assert returned == in_force == 2048
