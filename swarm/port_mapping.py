"""Port forwards on a home router through UPnP-IGD, so that a peer behind it can be dialled.

Most home routers offer UPnP, and where one does a peer asks it to forward its libp2p and lane TCP
ports (the same port outside as inside, so the lane port a peer hands out stays right), announces
the router's external address with its libp2p ports, renews the forwards every half lease and
removes them when it leaves. Whether a forward made the peer dialable is for other peers' dial-backs
to say (``swarm.reachability``): a router behind a second NAT (carrier-grade) forwards a port that
nobody outside reaches, and a peer that finds no router, or one that refuses, goes on as before
(relays, hole punching). The router's answers are untrusted input like any other: a malformed one
ends the attempt with a log line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from typing import Any, Callable

import miniupnpc
import multiaddr
import trio

from swarm.network import reach_of

log = logging.getLogger(__name__)

DISCOVER_MS = 2000  # how long discovery listens for routers' SSDP answers
CALL_SECONDS = 10.0  # the bound on one request to the router
LEASE_SECONDS = 3600  # a forward's lease; renewed every half lease
DESCRIPTION = "legion"


class PortMapping:
    """``run(ports)`` forwards ``ports`` for as long as it runs; ``addrs`` are the external
    addresses of the ``announced`` ones among them, once forwarded."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.addrs: list[multiaddr.Multiaddr] = []
        self.external_ip: str | None = None
        self._on_change = on_change  # told when addrs change (to re-check reachability, say)

    async def run(self, ports: list[int], announced: list[int]) -> None:
        gateway = await self._discover()
        if gateway is None:
            return
        mapped: list[int] = []
        try:
            while True:
                mapped = [port for port in ports if await self._forward(gateway, port)]
                addrs = [multiaddr.Multiaddr(f"/ip4/{self.external_ip}/tcp/{p}") for p in mapped if p in announced]
                if [str(a) for a in addrs] != [str(a) for a in self.addrs]:
                    self.addrs = addrs
                    log.info("UPnP: router %s forwards ports %s to this peer", self.external_ip,
                             ", ".join(map(str, mapped)) or "none")
                    self._on_change()
                await trio.sleep(LEASE_SECONDS / 2)
        finally:
            self.addrs = []
            with trio.CancelScope(shield=True), trio.move_on_after(CALL_SECONDS):
                for port in mapped:
                    with contextlib.suppress(Exception):  # the lease ends the forward anyway
                        await self._call(gateway.deleteportmapping, port, "TCP")

    async def _discover(self) -> Any:
        """The router's UPnP-IGD control point, or None (no router answers, or it offers no IGD)."""
        gateway = miniupnpc.UPnP()
        gateway.discoverdelay = DISCOVER_MS
        try:
            if not await self._call(gateway.discover):
                log.info("UPnP: no router offers port forwarding (none answered)")
                return None
            await self._call(gateway.selectigd)
            external = ipaddress.ip_address(await self._call(gateway.externalipaddress))
        except Exception as exc:  # miniupnpc raises bare Exceptions with the router's message
            log.info("UPnP: no router offers port forwarding (%s)", exc)
            return None
        if external.version != 4 or external.is_unspecified:
            log.info("UPnP: the router's external address %s is not one to announce; no port forwarding", external)
            return None
        if reach_of(str(external)) == 1:  # a LAN's, carrier-grade NAT's or link-local address
            log.info("UPnP: the router's external address %s is private (a second NAT beyond it?); "
                     "forwarding anyway, dial-backs will tell", external)
        self.external_ip = str(external)
        return gateway

    async def _forward(self, gateway: Any, port: int) -> bool:
        try:
            await self._call(gateway.addportmapping, port, "TCP", gateway.lanaddr, port, DESCRIPTION, "",
                             LEASE_SECONDS)
            return True
        except Exception as exc:  # taken by another host, refused by the router's rules
            log.info("UPnP: router %s would not forward port %d: %s", self.external_ip, port, exc)
            return False

    @staticmethod
    async def _call(function: Callable, *args: Any) -> Any:
        """A blocking miniupnpc call in a thread, abandoned (left to finish on its own) past
        ``CALL_SECONDS`` or on cancellation."""
        with trio.fail_after(CALL_SECONDS):
            return await trio.to_thread.run_sync(function, *args, abandon_on_cancel=True)
