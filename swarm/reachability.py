"""Whether other peers can dial this one: dial-backs by other peers, not self-reports, over AutoNAT v1
(``/libp2p/autonat/1.0.0``, the libp2p spec's messages), so go-libp2p peers can ask Legion peers
and answer them.

A peer asks a few connected peers to dial it back at its addresses. The other peer dials only the
IP it observes the asker at, at the TCP ports of those addresses (the spec's rule against
amplification: nobody can aim it elsewhere), and refuses requests that come over a relayed
connection (the asker's IP is unknown there). It dials
with a plain TCP connect to each port: py-libp2p's own AutoNAT server "dials" with ``host.connect``,
which returns at once over the connection the request came on, so it always answers yes. Behind a
home router that forwards nothing the observed address is the router's and the connect times out:
``private``. Where it connects: ``public``. Peers publish the verdict in their announcement and
``status`` shows it.
"""

from __future__ import annotations

import contextlib
import logging
import random

import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, INetStream
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from averaging.wire import PerPeerLimit, stream_peer

log = logging.getLogger(__name__)

PROTOCOL = "/libp2p/autonat/1.0.0"
MAX_MESSAGE = 8192  # a request or response: a peer id and a few addresses
DIAL_SECONDS = 3.0
ASKED = 3  # peers asked per check
MAX_PORTS = 4  # ports one request makes this peer dial
MAX_DIALS = 8  # dial-backs this peer makes for others at once
UNKNOWN, PUBLIC, PRIVATE = "unknown", "public", "private"


class RequestError(Exception):
    """A dial-back request that is malformed or that this peer may not serve."""


class Reachability:
    """``check`` asks peers to dial this host back; ``serve`` answers their requests."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self.status = UNKNOWN
        self._per_peer = PerPeerLimit(1)
        self._dials = trio.CapacityLimiter(MAX_DIALS)

    def serve(self) -> None:
        self.host.set_stream_handler(PROTOCOL, self._answer)

    async def check(self) -> str:
        """Ask up to ``ASKED`` connected peers to dial back; public if most of those that answered
        reached a port, private if not, unknown if nobody answered."""
        peers = list(self.host.get_connected_peers())
        random.shuffle(peers)
        answers: list[bool] = []
        request = Message(type=Message.DIAL)
        request.dial.peer.id = self.host.get_id().to_bytes()
        request.dial.peer.addrs.extend(a.to_bytes() for a in self.host.get_addrs())

        async def ask(peer) -> None:
            with trio.move_on_after(DIAL_SECONDS * MAX_PORTS + 5), contextlib.suppress(Exception):
                stream = await self.host.new_stream(peer, [PROTOCOL])
                try:
                    await stream.write(encode_varint_prefixed(request.SerializeToString()))
                    reply = Message.FromString(await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE))
                finally:
                    with trio.move_on_after(1), contextlib.suppress(Exception):
                        await stream.close()
                # refusals and errors are no verdict: only a dial tried counts
                if reply.type == Message.DIAL_RESPONSE and reply.dialResponse.status in (Message.OK, Message.E_DIAL_ERROR):
                    answers.append(reply.dialResponse.status == Message.OK)

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
                    data = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE)
                try:
                    reply = await self._dial_back(Message.FromString(data), stream)
                except (RequestError, DecodeError) as exc:
                    log.info("dial-back request from %s refused: %s", peer, exc)
                    reply = _response(Message.E_BAD_REQUEST if isinstance(exc, DecodeError) else Message.E_DIAL_REFUSED,
                                      str(exc)[:100])
                with trio.fail_after(5):
                    await stream.write(encode_varint_prefixed(reply.SerializeToString()))
            except trio.TooSlowError:
                log.info("dial-back request from %s dropped: too slow", peer)
            except Exception as exc:  # an escaping exception would tear down the host
                log.info("dial-back request from %s ended: %s: %s", peer, type(exc).__name__, exc)
            finally:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await stream.close()

    async def _dial_back(self, request: Message, stream: INetStream) -> Message:
        if request.type != Message.DIAL or request.dial.peer.id != stream_peer(stream).to_bytes():
            raise RequestError("not a dial request for the peer that sent it")
        if _relayed(stream):
            raise RequestError("dial requests over relayed connections are refused")
        observed = stream.get_remote_address()
        if not observed:
            raise RequestError("no observed address")
        ports = _ports(request.dial.peer.addrs)
        if not ports:
            raise RequestError("no TCP address to dial")
        async with self._dials:
            for port in ports:
                with trio.move_on_after(DIAL_SECONDS), contextlib.suppress(OSError):
                    connection = await trio.open_tcp_stream(observed[0], port)
                    await trio.aclose_forcefully(connection)
                    family = "ip6" if ":" in observed[0] else "ip4"
                    reached = multiaddr.Multiaddr(f"/{family}/{observed[0]}/tcp/{port}")
                    return _response(Message.OK, "", reached.to_bytes())
        return _response(Message.E_DIAL_ERROR, "dial failed")


def _response(status: int, text: str, addr: bytes = b"") -> Message:
    reply = Message(type=Message.DIAL_RESPONSE)
    reply.dialResponse.status = status
    reply.dialResponse.statusText = text
    if addr:
        reply.dialResponse.addr = addr
    return reply


def _ports(addrs) -> list[int]:
    """TCP ports of the IPv4 addresses (raw multiaddrs) in a request, at most ``MAX_PORTS``. They are
    dialled at the IP the asker is observed at, whatever IP the addresses name: a peer behind NAT
    knows only its private address, and a connect to its router's address at those ports is the
    test of whether it can be dialled."""
    ports: list[int] = []
    for raw in list(addrs)[:32]:
        with contextlib.suppress(Exception):
            port = int(multiaddr.Multiaddr(bytes(raw)).value_for_protocol("tcp"))
            if 0 < port < 65536 and port not in ports:
                ports.append(port)
    return ports[:MAX_PORTS]


def _relayed(stream: INetStream) -> bool:
    """Whether ``stream`` runs over a relayed connection; True where that cannot be told."""
    try:
        addrs = stream.muxed_conn.get_transport_addresses()
    except Exception:
        return True
    return addrs is None or any("/p2p-circuit" in str(a) for a in addrs)
