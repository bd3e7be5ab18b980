"""Joining a swarm through any reachable bootstrap peer."""

from __future__ import annotations

import logging

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

log = logging.getLogger(__name__)


class BootstrapError(Exception):
    """No bootstrap peer could be reached; the message names each address and why."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


async def connect_bootstrap_peers(host: IHost, addrs: list[str], timeout: float) -> list[ID]:
    """Dial every bootstrap address at once, each within ``timeout`` seconds; return the peers
    reached. Raises ``BootstrapError`` naming every failure if none answers."""
    reached: list[ID] = []
    failures: dict[str, str] = {}

    async def dial(addr: str) -> None:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            failures[addr] = f"not a multiaddr ending in /p2p/<peer id>: {_describe(exc)}"
            return
        if info.peer_id == host.get_id():
            failures[addr] = "that is this peer's own address"
            return
        try:
            with trio.fail_after(timeout):
                await host.connect(info)
            reached.append(info.peer_id)
        except trio.TooSlowError:
            failures[addr] = f"no answer within {timeout:g}s"
        except Exception as exc:
            failures[addr] = _describe(exc)

    async with trio.open_nursery() as nursery:
        for addr in addrs:
            nursery.start_soon(dial, addr)
    for addr, why in failures.items():
        log.warning("bootstrap %s failed: %s", addr, why)
    if not reached:
        details = "\n".join(f"  {addr}: {why}" for addr, why in failures.items()) or "  (no addresses given)"
        raise BootstrapError(f"could not reach any bootstrap peer:\n{details}")
    return reached
