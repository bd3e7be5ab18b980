"""Peers in the test's own process, on 127.0.0.1."""

import trio

from swarm.peer import Peer, PeerConfig

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def start_peers(nursery, count: int, *, lanes: bool = True) -> list[Peer]:
    """A seed and ``count - 1`` peers bootstrapped from it, heartbeat 1 s, running in ``nursery``
    (bulk data on libp2p streams only without ``lanes``)."""
    seed = await nursery.start(Peer(PeerConfig(listen=LOOPBACK, seed=True, heartbeat=1, lanes=lanes)).run)
    others: list[Peer] = []

    async def start_one() -> None:
        others.append(await nursery.start(Peer(PeerConfig(listen=LOOPBACK, bootstrap=[str(seed.addrs[0])],
                                                          heartbeat=1, lanes=lanes)).run))

    async with trio.open_nursery() as starting:  # at once: each start waits on the network
        for _ in range(count - 1):
            starting.start_soon(start_one)
    return [seed, *others]
