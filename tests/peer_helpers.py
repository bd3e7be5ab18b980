"""Peers in the test's own process, on 127.0.0.1."""

from swarm.peer import Peer, PeerConfig

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def start_peers(nursery, count: int, *, lanes: bool = True) -> list[Peer]:
    """A seed and ``count - 1`` peers bootstrapped from it, heartbeat 1 s, running in ``nursery``
    (bulk data on libp2p streams only without ``lanes``)."""
    seed = await nursery.start(Peer(PeerConfig(listen=LOOPBACK, seed=True, heartbeat=1, lanes=lanes)).run)
    others = [await nursery.start(Peer(PeerConfig(listen=LOOPBACK, bootstrap=[str(seed.addrs[0])], heartbeat=1,
                                                  lanes=lanes)).run)
              for _ in range(count - 1)]
    return [seed, *others]
