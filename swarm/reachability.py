"""Whether other peers can dial this one: dial-backs by other peers (AutoNAT-style), not self-reports.

A peer asks a few connected peers to open a TCP connection to its listening ports. The other peer
dials only the IP address the request came from (the one it observes for this peer), never one named
in the request, so nobody can use it to connect elsewhere. Behind a home router that forwards
nothing, the observed address is the router's and the dial times out: ``private``. Where the dials
succeed: ``public``. Peers publish the verdict in their announcement and ``status`` shows it.
"""

from __future__ import annotations

import contextlib
import logging
import random

import trio
from libp2p.abc import IHost, INetStream

from averaging.wire import FrameError, PerPeerLimit, read_frame, stream_peer, write_frame

log = logging.getLogger(__name__)

PROTOCOL = "/legion/dialback/1.0.0"
DIAL_SECONDS = 3.0
ASKED = 3  # peers asked per check
MAX_PORTS = 4
MAX_DIALS = 8  # dial-backs this peer makes for others at once
UNKNOWN, PUBLIC, PRIVATE = "unknown", "public", "private"


class Reachability:
    """``check`` asks peers to dial this host back; ``serve`` answers their requests."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self.status = UNKNOWN
        self._per_peer = PerPeerLimit(1)
        self._dials = trio.CapacityLimiter(MAX_DIALS)

    def serve(self) -> None:
        self.host.set_stream_handler(PROTOCOL, self._answer)

    def _ports(self) -> list[int]:
        ports = []
        for addr in self.host.get_addrs():
            with contextlib.suppress(Exception):
                ports.append(int(addr.value_for_protocol("tcp")))
        return sorted(set(ports))[:MAX_PORTS]

    async def check(self) -> str:
        """Ask up to ``ASKED`` connected peers to dial back; public if most of those that answered
        reached a port, private if not, unknown if nobody answered."""
        peers = list(self.host.get_connected_peers())
        random.shuffle(peers)
        answers: list[bool] = []

        async def ask(peer) -> None:
            with trio.move_on_after(DIAL_SECONDS * MAX_PORTS + 5), contextlib.suppress(Exception):
                stream = await self.host.new_stream(peer, [PROTOCOL])
                try:
                    await write_frame(stream, {"t": "dial", "ports": self._ports()})
                    reply, _ = await read_frame(stream, 0)
                finally:
                    with trio.move_on_after(1), contextlib.suppress(Exception):
                        await stream.close()
                if reply.get("t") == "result" and isinstance(reply.get("reached"), bool):
                    answers.append(reply["reached"])

        async with trio.open_nursery() as nursery:
            for peer in peers[:ASKED]:
                nursery.start_soon(ask, peer)
        # the majority of those that answered: one lying peer cannot make a NATed peer "public"
        status = (PUBLIC if 2 * sum(answers) > len(answers) else PRIVATE) if answers else UNKNOWN
        if status != self.status:
            log.info("reachability: %s (%d of %d peers reached this peer)", status, sum(answers), len(answers))
        self.status = status
        return status

    async def _answer(self, stream: INetStream) -> None:
        peer = stream_peer(stream)
        with self._per_peer.slot(peer) as admitted:
            try:
                if not admitted:
                    return
                with trio.fail_after(5):
                    request, _ = await read_frame(stream, 0)
                ports = request.get("ports")
                address = stream.get_remote_address()
                if not (isinstance(ports, list) and len(ports) <= MAX_PORTS and address
                        and all(type(p) is int and 0 < p < 65536 for p in ports)):
                    raise FrameError("malformed dial-back request")
                reached = False
                async with self._dials:
                    for port in ports:
                        with trio.move_on_after(DIAL_SECONDS), contextlib.suppress(OSError):
                            connection = await trio.open_tcp_stream(address[0], port)
                            await trio.aclose_forcefully(connection)
                            reached = True
                            break
                await write_frame(stream, {"t": "result", "reached": reached})
            except (FrameError, trio.TooSlowError) as exc:
                log.info("dial-back request from %s dropped: %s", peer, exc)
            except Exception as exc:  # an escaping exception would tear down the host
                log.info("dial-back request from %s ended: %s: %s", peer, type(exc).__name__, exc)
            finally:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await stream.close()
