"""Port forwards on a home router, so that a peer behind it can be dialled: UPnP-IGD, else NAT-PMP.

Most home routers offer UPnP-IGD, and many (Apple's, and any running miniupnpd) NAT-PMP
(RFC 6886). Where one does, a peer asks it to forward its libp2p and lane TCP ports (the same port
outside as inside, so the lane port a peer hands out stays right), announces the router's external
address with its libp2p ports, renews the forwards every half lease and removes them when it leaves.
UPnP is tried first; NAT-PMP where no router answers UPnP, at the default gateway (read from
``/proc/net/route``: Linux only). Whether a forward made the peer dialable is for other peers'
dial-backs to say (``swarm.reachability``): a router behind a second NAT (carrier-grade) forwards a
port that nobody outside reaches, and a peer that finds no router, or one that refuses, goes on as
before (relays, hole punching). The router's answers are untrusted input like any other: a
malformed one ends the attempt with a log line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
from pathlib import Path
from typing import Any, Callable

import miniupnpc
import multiaddr
import trio

from swarm.network import reach_of

log = logging.getLogger(__name__)

DISCOVER_MS = 2000  # how long discovery listens for routers' SSDP answers
DISCOVER_TRIES = 3  # a router starting up (or busy) can answer discovery but not yet its IGD requests
DISCOVER_PAUSE = 5.0  # seconds between tries
CALL_SECONDS = 10.0  # the bound on one request to the router
LEASE_SECONDS = 3600  # a forward's lease; renewed every half lease
DESCRIPTION = "legion"
NATPMP_PORT = 5351
NATPMP_TRIES = 4  # RFC 6886 waits 250 ms, then twice as long each try: 3.75 s in all


class RouterError(Exception):
    """A router refused a request or answered nonsense."""


class PortMapping:
    """``run(ports)`` forwards ``ports`` for as long as it runs; ``addrs`` are the external
    addresses of the ``announced`` ones among them, once forwarded."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.addrs: list[multiaddr.Multiaddr] = []
        self.external_ip: str | None = None
        self._on_change = on_change  # told when addrs change (to re-check reachability, say)

    async def run(self, ports: list[int], announced: list[int]) -> None:
        router = None
        for attempt in range(DISCOVER_TRIES):
            if attempt:
                await trio.sleep(DISCOVER_PAUSE)
            router = await Upnp.discover() or await NatPmp.discover()
            if router is not None:
                break
        if router is None:
            log.info("no router offers port forwarding (none answered UPnP or NAT-PMP)")
            return
        self.external_ip = router.external_ip
        mapped: list[int] = []
        try:
            while True:
                mapped = [port for port in ports if await self._forward(router, port)]
                addrs = [multiaddr.Multiaddr(f"/ip4/{self.external_ip}/tcp/{p}") for p in mapped if p in announced]
                if [str(a) for a in addrs] != [str(a) for a in self.addrs]:
                    self.addrs = addrs
                    log.info("%s: router %s forwards ports %s to this peer", router.name, self.external_ip,
                             ", ".join(map(str, mapped)) or "none")
                    self._on_change()
                await trio.sleep(LEASE_SECONDS / 2)
        finally:
            self.addrs = []
            with trio.CancelScope(shield=True), trio.move_on_after(CALL_SECONDS):
                for port in mapped:
                    with contextlib.suppress(Exception):  # the lease ends the forward anyway
                        await router.remove(port)

    async def _forward(self, router: "Upnp | NatPmp", port: int) -> bool:
        try:
            await router.forward(port)
            return True
        except Exception as exc:  # taken by another host, refused by the router's rules, no answer
            log.info("%s: router %s would not forward port %d: %s", router.name, self.external_ip, port, exc)
            return False


def _usable_external(name: str, address: str) -> str | None:
    """The router's external address if it is one to announce."""
    external = ipaddress.ip_address(address)
    if external.version != 4 or external.is_unspecified:
        log.info("%s: the router's external address %s is not one to announce; no port forwarding", name, external)
        return None
    if reach_of(str(external)) == 1:  # a LAN's, carrier-grade NAT's or link-local address
        log.info("%s: the router's external address %s is private (a second NAT beyond it?); "
                 "forwarding anyway, dial-backs will tell", name, external)
    return str(external)


class Upnp:
    """A UPnP-IGD router (miniupnpc)."""

    name = "UPnP"

    def __init__(self, gateway: Any, external_ip: str) -> None:
        self.gateway, self.external_ip = gateway, external_ip

    @classmethod
    async def discover(cls) -> "Upnp | None":
        """The router's UPnP-IGD control point, or None (no router answers, or it offers no IGD)."""
        gateway = miniupnpc.UPnP()
        gateway.discoverdelay = DISCOVER_MS
        try:
            if not await _call(gateway.discover):
                log.info("UPnP: no router answered")
                return None
            await _call(gateway.selectigd)
            external = _usable_external(cls.name, await _call(gateway.externalipaddress))
        except Exception as exc:  # miniupnpc raises bare Exceptions with the router's message
            log.info("UPnP: no router offers port forwarding (%s)", exc)
            return None
        return None if external is None else cls(gateway, external)

    async def forward(self, port: int) -> None:
        await _call(self.gateway.addportmapping, port, "TCP", self.gateway.lanaddr, port, DESCRIPTION, "",
                    LEASE_SECONDS)

    async def remove(self, port: int) -> None:
        await _call(self.gateway.deleteportmapping, port, "TCP")


async def _call(function: Callable, *args: Any) -> Any:
    """A blocking miniupnpc call in a thread, abandoned (left to finish on its own) past
    ``CALL_SECONDS`` or on cancellation."""
    with trio.fail_after(CALL_SECONDS):
        return await trio.to_thread.run_sync(function, *args, abandon_on_cancel=True)


class NatPmp:
    """A NAT-PMP router (RFC 6886) at this host's default gateway, over UDP port 5351."""

    name = "NAT-PMP"

    def __init__(self, gateway: str, external_ip: str) -> None:
        self.gateway, self.external_ip = gateway, external_ip

    @classmethod
    async def discover(cls) -> "NatPmp | None":
        gateway = default_gateway()
        if gateway is None:
            log.info("NAT-PMP: no default gateway to ask")
            return None
        try:
            reply = await _natpmp_request(gateway, struct.pack("!BB", 0, 0), 12)
            external = _usable_external(cls.name, socket.inet_ntoa(reply[8:12]))
        except (RouterError, OSError) as exc:
            log.info("NAT-PMP: gateway %s offers no port forwarding (%s)", gateway, exc)
            return None
        return None if external is None else cls(gateway, external)

    async def forward(self, port: int, lifetime: int = LEASE_SECONDS) -> None:
        request = struct.pack("!BBHHHI", 0, 2, 0, port, port if lifetime else 0, lifetime)
        reply = await _natpmp_request(self.gateway, request, 16)
        internal, external = struct.unpack("!HH", reply[8:12])
        if internal != port:
            raise RouterError(f"answered for port {internal}")
        if lifetime and external != port:  # the port a peer hands out must be the one outside
            with contextlib.suppress(RouterError, OSError):
                await self.remove(port)
            raise RouterError(f"offered outside port {external}, not the same port")

    async def remove(self, port: int) -> None:
        await self.forward(port, lifetime=0)


async def _natpmp_request(gateway: str, request: bytes, size: int) -> bytes:
    """``gateway``'s answer to ``request`` (``size`` bytes, result code 0), retried as RFC 6886 says."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect((gateway, NATPMP_PORT))
        wait = 0.25
        for _ in range(NATPMP_TRIES):
            await sock.send(request)
            with trio.move_on_after(wait):
                while True:
                    reply = await sock.recv(64)
                    if len(reply) >= 4 and reply[1] == request[1] + 128:
                        break
                if len(reply) < size or reply[0] != 0:
                    raise RouterError(f"a malformed answer of {len(reply)} bytes")
                code = struct.unpack("!H", reply[2:4])[0]
                if code:
                    raise RouterError(f"result code {code}")
                return reply
            wait *= 2
    raise RouterError("no answer")


def default_gateway(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The IPv4 default gateway from Linux's routing table, or None (none, or not Linux)."""
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "00000000" and int(fields[3], 16) & 2:  # RTF_GATEWAY
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None
