"""Relays: dialable peers carry connections for peers behind NAT (py-libp2p's Circuit Relay v2).

Every peer runs the relay's *stop* side and its transport, so it can be reached through a relay and
can dial others through one. A peer that others can dial (``--relay-service``, on by default for
seeds) also runs the *hop* side within limits: reservations, circuits at once, and each circuit's
bytes and lifetime. A peer that others cannot dial (``swarm.reachability`` says private) reserves a
slot on up to ``RESERVATIONS`` relays among the peers it knows, renews them, and advertises
``<relay address>/p2p-circuit/p2p/<self>`` addresses (``addrs``) after its own, in its announcement
and matchmaking declarations (not through the host's address factory: py-libp2p's ``get_addrs``
cuts a circuit address at its first ``/p2p/``, turning it into the relay's address under this
peer's id).

py-libp2p's swarm never dials a ``/p2p-circuit`` address itself, so ``install`` wraps the host's
``new_stream``: when a peer cannot be dialled directly and its known addresses include circuit
addresses, the connection is made through the relay and the stream opened over it. Bulk data then
also flows through the relay (lanes cannot follow: their TCP dial fails and they fall back), but only
within the relay's limits; a circuit that reaches them is reset and the next stream makes a new one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

log = logging.getLogger(__name__)

RESERVATIONS = 2  # relays a peer behind NAT holds a slot on
RESERVE_SECONDS = 10.0  # the longest one reservation request may take
CHECK_SECONDS = 15.0  # between checks that the reservations still stand
PUNCH_WATCH_SECONDS = 60.0  # how long a relayed connection is watched for a direct one
DIRECT_FIRST_SECONDS = 1.5  # a direct dial to a peer with circuit addresses before the relay is used
# DCUtR's dials: its first step, a plain dial of the peer's direct addresses, waits this long for
# addresses behind another NAT that drops the SYN (py-libp2p's 10 s delayed every hole punch by 10 s)
PUNCH_DIAL_SECONDS = 3


class _CircuitsClosedByTheirTasks(dict):
    """py-libp2p's table of active circuits, holding what it files (all are closed when the relay
    stops) but finding no peer in it: a circuit's end must not close another's streams."""

    def __contains__(self, key: object) -> bool:
        return False


@dataclass(frozen=True)
class RelayLimitsConfig:
    """What one relay grants (``--relay-limits``); the defaults suit a seed on a home uplink."""

    reservations: int = 64  # peers holding a slot at once
    circuits: int = 32  # relayed connections at once
    circuit_seconds: int = 600  # one circuit's lifetime
    circuit_bytes: int = 64 << 20  # bytes one circuit carries (both ways together)

    def limits(self) -> RelayLimits:
        return RelayLimits(duration=self.circuit_seconds, data=self.circuit_bytes,
                           max_circuit_conns=self.circuits, max_reservations=self.reservations)


def is_circuit(addr: multiaddr.Multiaddr) -> bool:
    return "/p2p-circuit" in str(addr)


class Relays:
    """One host's relay parts: ``run`` them, ``install`` the dial fallback, ``reserve`` when private."""

    def __init__(self, host: IHost, *, serve: bool, limits: RelayLimitsConfig = RelayLimitsConfig()) -> None:
        self.host = host
        self.serve = serve
        self.limits = limits
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if serve else RelayRole(0))
        self._protocol = CircuitV2Protocol(host, limits=limits.limits(), allow_hop=serve)
        self._config = RelayConfig(roles=roles, limits=limits.limits())
        self._transport: CircuitV2Transport | None = None
        self._nursery: trio.Nursery | None = None
        self._held: dict[ID, multiaddr.Multiaddr] = {}  # relay -> the circuit address through it
        self.relayed_dials = 0  # connections this peer opened through a relay
        self.relayed_bytes = 0  # bytes this peer carried for others' circuits (both ways)
        if serve:
            self._count_relayed_bytes()
            self._end_circuits_alone()

    def _count_relayed_bytes(self) -> None:
        """py-libp2p 0.8.1's hop side keeps no byte count one can read; every chunk a circuit
        carries is read through ``_read_stream_with_retry`` (its one use), so that is counted."""
        read = self._protocol._read_stream_with_retry

        async def counted(stream: INetStream, *args: Any, **kwargs: Any) -> bytes | None:
            data = await read(stream, *args, **kwargs)
            self.relayed_bytes += len(data or b"")
            return data

        self._protocol._read_stream_with_retry = counted

    def _end_circuits_alone(self) -> None:
        """py-libp2p 0.8.1's hop side files circuits under one peer id each, and when a circuit
        ends it closes the streams filed under its peers' ids: those of the latest *other*
        circuit to or from them. A home peer reached by several peers through one relay lost
        them all when one connection closed (every relayed all-reduce stream broke at once, and
        the round failed for the whole group). Here the table finds no peer, and each circuit's
        relay task closes its own two streams."""
        self._protocol._active_relays = _CircuitsClosedByTheirTasks()
        relay, close = self._protocol._relay_data, self._protocol._close_stream

        async def relay_then_close(src: INetStream, dst: INetStream, *args: Any, **kwargs: Any) -> None:
            try:
                await relay(src, dst, *args, **kwargs)
            finally:
                with trio.CancelScope(shield=True):
                    await close(src)
                    await close(dst)

        self._protocol._relay_data = relay_then_close

    @property
    def addrs(self) -> list[multiaddr.Multiaddr]:
        """Circuit addresses of the reservations held now (advertised after the direct ones)."""
        me = multiaddr.Multiaddr(f"/p2p/{self.host.get_id()}")
        return [addr.encapsulate(me) for addr in self._held.values()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self._protocol), background_trio_service(DCUtRProtocol(self.host, dial_timeout=PUNCH_DIAL_SECONDS)), \
                trio.open_nursery() as nursery:
            self._transport = CircuitV2Transport(self.host, self._protocol, self._config)
            self._nursery = nursery
            self.install()
            if self.serve:
                log.info("relay service on: %d reservations, %d circuits, %d s and %d MiB per circuit",
                         self.limits.reservations, self.limits.circuits, self.limits.circuit_seconds,
                         self.limits.circuit_bytes >> 20)
            task_status.started()
            await trio.sleep_forever()

    def install(self) -> None:
        """Open streams and connections through a relay where a peer cannot be dialled directly."""
        direct, direct_connect = self.host.new_stream, self.host.connect

        async def new_stream(peer_id: ID, protocol_ids: Any, *args: Any, **kwargs: Any) -> INetStream:
            await self._relayed_first(peer_id, direct_connect)
            try:
                return await direct(peer_id, protocol_ids, *args, **kwargs)
            except Exception:
                if self._connected(peer_id) or not await self.connect(peer_id):
                    raise  # connected, so not a dial failure; or no relay reaches it either
            return await direct(peer_id, protocol_ids, *args, **kwargs)

        async def connect(peer_info: Any) -> None:
            self.host.get_peerstore().add_addrs(peer_info.peer_id, peer_info.addrs, 600)
            if await self._relayed_first(peer_info.peer_id, direct_connect):
                return
            try:
                await direct_connect(peer_info)
            except Exception:
                if not await self.connect(peer_info.peer_id):
                    raise

        self.host.new_stream = new_stream  # type: ignore[method-assign]
        self.host.connect = connect  # type: ignore[method-assign]

    async def _watch_for_direct(self, peer_id: ID) -> None:
        """Log when hole punching (DCUtR, run by both sides over the relayed connection) gives a
        direct connection to a peer first reached through a relay."""
        with trio.move_on_after(PUNCH_WATCH_SECONDS):
            while True:
                await trio.sleep(1.0)
                for conn in self.host.get_network().get_connections(peer_id):
                    with contextlib.suppress(Exception):
                        addrs = conn.get_transport_addresses()
                        if addrs and not any(is_circuit(a) for a in addrs):
                            log.info("direct connection to %s (hole punched) at %s", peer_id, addrs[0])
                            return

    def _connected(self, peer_id: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer_id))

    async def _relayed_first(self, peer_id: ID, direct_connect: Any) -> bool:
        """A peer not connected that has circuit addresses is most likely behind NAT: a direct dial
        gets a moment (a peer on the same LAN answers at once), then the relay is used, instead
        of waiting out the whole dial timeout first. True once connected this way, False where it
        does not apply; a peer it reaches neither way raises ``ConnectionError`` (the caller does
        not dial again: a plain dial of such a peer's direct addresses hung ~12 s)."""
        circuits = self._circuits(peer_id)  # now: a failed dial (a peer id mismatch) can clear the peer's addresses
        if self._connected(peer_id) or not circuits:
            return False
        tried = trio.Event()

        async def try_direct() -> None:
            with trio.move_on_after(DIRECT_FIRST_SECONDS), contextlib.suppress(Exception):
                await direct_connect(PeerInfo(peer_id, self._direct(peer_id)))
            tried.set()

        # Beside this task, not in it: py-libp2p's dial does not always end when cancelled (parts of
        # it run shielded), and against home NATs that drop the SYN it held the relay back ~12 s:
        # peers connecting ahead through a relay gave up after 10 s, and missed their first round.
        if self._nursery is not None:
            self._nursery.start_soon(try_direct)
            with trio.move_on_after(DIRECT_FIRST_SECONDS):
                await tried.wait()
        else:
            await try_direct()
        if not self._connected(peer_id):
            await self.connect(peer_id, circuits)
        if not self._connected(peer_id):  # (the direct dial may still have come through meanwhile)
            raise ConnectionError(f"{peer_id} reached neither directly nor through its relays")
        return True

    def _circuits(self, peer_id: ID) -> list[multiaddr.Multiaddr]:
        with contextlib.suppress(Exception):
            return [a for a in self.host.get_peerstore().addrs(peer_id) if is_circuit(a)]
        return []

    def _direct(self, peer_id: ID) -> list[multiaddr.Multiaddr]:
        with contextlib.suppress(Exception):
            return [a for a in self.host.get_peerstore().addrs(peer_id) if not is_circuit(a)]
        return []

    async def connect(self, peer_id: ID, circuits: list[multiaddr.Multiaddr] | None = None) -> bool:
        """A connection to ``peer_id`` through one of the relays ``circuits`` (default: its known
        addresses) name."""
        if self._transport is None:
            return False
        with contextlib.suppress(Exception):
            for addr in self._circuits(peer_id) if circuits is None else circuits:
                target = addr if str(addr).endswith(f"/p2p/{peer_id}") else addr.encapsulate(
                    multiaddr.Multiaddr(f"/p2p/{peer_id}"))
                started = trio.current_time()
                try:
                    with trio.fail_after(RESERVE_SECONDS):
                        await self._transport.dial(target)
                    self.relayed_dials += 1
                    log.info("connected to %s through a relay (%.1f s)", peer_id, trio.current_time() - started)
                    if self._nursery is not None:
                        self._nursery.start_soon(self._watch_for_direct, peer_id)
                    return True
                except Exception as exc:  # the relay is gone, full, or the peer left it
                    log.info("no circuit to %s through %s (%.1f s): %s", peer_id, addr,
                             trio.current_time() - started, exc)
        return False

    async def keep_reservations(self, candidates: list[ID]) -> int:
        """Hold slots on up to ``RESERVATIONS`` relays, trying ``candidates`` in order (connected
        peers that may serve relays); returns how many are held."""
        transport = self._transport
        if transport is None or self._nursery is None:
            return 0
        now = time.time()
        for relay in list(self._held):  # expired, or the relay is gone
            if transport._reservations.get(relay, 0) <= now or not self._connected(relay):
                log.info("relay reservation on %s lapsed", relay)
                del self._held[relay]
        for relay in candidates:
            if len(self._held) >= RESERVATIONS:
                break
            if relay in self._held or relay == self.host.get_id() or not self._may_relay(relay):
                continue
            stream = None
            try:
                with trio.fail_after(RESERVE_SECONDS):
                    stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
                    reserved = await transport.reserve(stream, relay, self._nursery)
            except Exception as exc:  # no relay service there, or it refused
                log.debug("no relay reservation on %s: %s", relay, exc)
                reserved = False
            finally:
                if stream is not None:
                    with trio.move_on_after(1), contextlib.suppress(Exception):
                        await stream.close()
            address = self._relay_address(relay) if reserved else None
            if address is not None:
                self._held[relay] = address
                log.info("reserved a relay slot on %s: reachable at %s", relay, address)
        return len(self._held)

    def _may_relay(self, peer: ID) -> bool:
        """False for a peer whose Identify lists no relay service (asking it would only fail)."""
        with contextlib.suppress(Exception):
            protocols = self.host.get_peerstore().get_protocols(peer)
            return not protocols or HOP_PROTOCOL in protocols
        return True

    def _relay_address(self, relay: ID) -> multiaddr.Multiaddr | None:
        """``<the relay's direct address>/p2p/<relay>/p2p-circuit``, from the connection to it."""
        for conn in self.host.get_network().get_connections(relay):
            with contextlib.suppress(Exception):
                for addr in conn.get_transport_addresses():
                    if not is_circuit(addr):
                        return addr.encapsulate(multiaddr.Multiaddr(f"/p2p/{relay}/p2p-circuit"))
        return None
