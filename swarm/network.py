"""Building a libp2p host the way every Legion peer needs it: TCP, Noise only, Yamux."""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import math
import os
import socket
import time
from typing import Any, Awaitable, Callable

import multiaddr
import psutil
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError
from libp2p.rcmgr import ResourceLimits, new_resource_manager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedConnUnavailable
from libp2p.stream_muxer.yamux.yamux import Yamux

from averaging.wire import socket_under

log = logging.getLogger(__name__)

DIAL_TIMEOUT = 5.0
# Connection limits. py-libp2p's (300 in all, 250 inbound, idle ones pruned above 200) are below
# what a peer needs at 1,000 peers: the scale simulator counts the distinct peers each exchanges DHT
# messages with in a minute, median 333 and busiest 655 (at 10,000: 414 and 1,090;
# ``bench/scale.py --only dht --beats 12``), groups and catch-up sources come on top, and a peer
# refused or pruned is redialled (a TCP, Noise and yamux handshake) at its next message. An idle
# connection costs ~59 KB a side (``bench/connection_cost.py``): 1,024 of them ~60 MB. Idle
# connections (no stream open, older than py-libp2p's 20 s grace) are closed above HIGH_WATERMARK,
# down towards LOW_WATERMARK.
MAX_CONNECTIONS = 1024
HIGH_WATERMARK = 768
LOW_WATERMARK = 128

PEER_ADDRS_SECONDS = 600  # how long addresses a DHT lookup found stay in the peerstore
_LOOKING_UP: contextvars.ContextVar[bool] = contextvars.ContextVar("looking_up", default=False)

# Longest a yamux frame (64 KiB at most) may take to leave: a peer that has not taken it by then is
# hung, and its connection is closed.
FRAME_STALL_SECONDS = 10.0


def build_host(key_pair: KeyPair, psk: str | None = None, dial_timeout: float = DIAL_TIMEOUT,
               announce: list[multiaddr.Multiaddr] = (),
               mapped: Callable[[], list[multiaddr.Multiaddr]] = list) -> IHost:
    """A host that offers only Noise (py-libp2p's default list includes plaintext and secio) and
    advertises addresses others can dial (``advertised_addrs``: ``announce`` first, then what
    ``mapped`` gives at the time, a router's forwards, say).

    ``max_connections_per_peer=1`` avoids the ~250 ms stall py-libp2p 0.8.1 adds to every dial.
    ``psk`` (64 hex digits) makes the host a member of a libp2p private network.
    """
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    config = ConnectionConfig(max_connections_per_peer=1, dial_timeout=dial_timeout,
                              outbound_upgrade_timeout=dial_timeout, inbound_upgrade_timeout=dial_timeout,
                              max_connections=MAX_CONNECTIONS, high_watermark=HIGH_WATERMARK,
                              low_watermark=LOW_WATERMARK)
    # py-libp2p's resource manager has limits of its own (256 established inbound, 1,000 in all)
    limits = ConnectionLimits(max_pending_inbound=64, max_pending_outbound=64, max_established_per_peer=8,
                              max_established_inbound=MAX_CONNECTIONS, max_established_outbound=MAX_CONNECTIONS,
                              max_established_total=MAX_CONNECTIONS)
    resources = new_resource_manager(ResourceLimits(max_connections=MAX_CONNECTIONS), connection_limits=limits)
    _write_yamux_frames_whole()
    _yamux_window_updates_at_half()
    host = new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise}, resource_manager=resources,
                    muxer_opt=create_yamux_muxer_option(), connection_config=config, psk=psk,
                    addrs_factory=lambda addrs: advertised_addrs(addrs, [*announce, *mapped()]))
    _rank_dialled_addrs(host)
    _no_auto_dials(host)
    return host


def _no_auto_dials(host: IHost) -> None:
    """Turn off py-libp2p's auto-connector. Below its low watermark it dials peers from the
    peerstore up to the watermarks' midpoint (448 connections with ours), every 30 s and after
    every disconnect: with 64 peers on this machine every peer dialled every other, both cores were
    busy with handshakes and DHT requests timed out, and not one group formed
    (``bench/matchmaking_swarm.py``, ``bench/dht.py --peers 64``). Legion connects where it has a
    message to send (DHT, matchmaking, groups, downloads, ``Peer.connect_ahead``)."""
    async def dial_nobody() -> None:
        return None

    host.get_network().auto_connector.maybe_connect = dial_nobody  # type: ignore[method-assign]


def look_up_unknown_peers(host: IHost, find_peer: Callable[[ID], Awaitable[PeerInfo | None]], timeout: float) -> None:
    """Peers are often known only by id (a checkpoint's holders, read from the holdings; donors,
    from the run board; a shard's owners, from the bids), and py-libp2p dials only the addresses
    its peerstore holds, learnt as a side effect of DHT answers: in a large swarm, most peers'
    never are. A stream to a peer with no connection and no known address first looks the peer up
    in the DHT (``find_peer``: the closest-peer lookup of its id), for at most ``timeout``."""
    new_stream = host.new_stream

    async def addressed_new_stream(peer_id: ID, protocol_ids: Any, *args: Any, **kwargs: Any) -> INetStream:
        if not _LOOKING_UP.get() and not host.get_network().get_connections(peer_id) and not _known_addrs(host, peer_id):
            found, token = None, _LOOKING_UP.set(True)  # the lookup's own streams are not looked up
            try:
                with trio.move_on_after(timeout):
                    found = await find_peer(peer_id)
            finally:
                _LOOKING_UP.reset(token)
            if found is not None and found.addrs:
                host.get_peerstore().add_addrs(peer_id, found.addrs, PEER_ADDRS_SECONDS)
            log.debug("looked up %s, known only by id: %s", peer_id, "found" if found and found.addrs else "not found")
        return await new_stream(peer_id, protocol_ids, *args, **kwargs)

    host.new_stream = addressed_new_stream  # type: ignore[method-assign]


def _known_addrs(host: IHost, peer_id: ID) -> bool:
    try:
        return bool(host.get_peerstore().addrs(peer_id))
    except PeerStoreError:  # a peer the peerstore never heard of
        return False


def raise_open_file_limit(wanted: int = 2 * MAX_CONNECTIONS) -> int | None:
    """Raise this process's soft limit on open files towards ``wanted`` (within the hard limit):
    every connection and lane is a socket, and desktops often start processes with 1,024. Returns
    the limit in force (None where the system has no such limit to read: Windows)."""
    try:
        import resource
    except ImportError:
        return None

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < MAX_CONNECTIONS:
        log.warning("this process may open only %d files: fewer connections than a large swarm needs "
                    "(raise it with ulimit -n %d)", soft, wanted)
    return soft


def _yamux_window_updates_at_half() -> None:
    """py-libp2p's yamux sends a window update after every read (``PY_YAMUX_RELEASE_ON_READ``, on by
    default), go-yamux once half the window is read. A DHT message and its answer on a kept stream
    cost ~1,220 bytes on the wire with an update after every read, ~890 without
    (``bench/dht_request_cost.py``, 2026-12-06), and a peer's upkeep is such messages; bulk bytes
    on a py-libp2p stream moved as fast or faster without (``bench/lanes.py``: 108-143 MB/s against
    92-101). A value set in the environment is kept."""
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")


def _write_yamux_frames_whole() -> None:
    """py-libp2p 0.8.1 lets a cancelled task stop inside a frame's write: after Noise has
    encrypted it (its nonce is spent) or partway through the bytes. The other side then fails to
    authenticate the next frame and drops the connection, with every stream on it: a DHT read
    cancelled once it had enough answers cost a group its round, 2 in 6 runs of 8 peers on one
    machine. So a frame, once its turn to write came, is written whole: shielded from
    cancellation (the canceller sees it when the frame is out), but a peer that has not taken it
    within ``FRAME_STALL_SECONDS`` gets its connection closed instead. Not on a connection relayed
    through another peer: its frames wait on the relay's flow control, and shielding them there
    held every write behind one (a 3-peer NAT test took 72 s instead of 32, and a home peer was
    never invited into a group in one CI run)."""
    if getattr(Yamux, "_frames_whole", False):
        return

    original = Yamux._write_frame

    async def write_frame(self: Yamux, data: bytes) -> None:
        socket = getattr(self, "_socket", False)
        if socket is False:
            socket = self._socket = socket_under(self)
        if socket is None:  # relayed: not a socket of its own underneath (its frames move as the relay lets them)
            return await original(self, data)
        async with self._write_lock:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FRAME_STALL_SECONDS) as stalled:
                    await self.secured_conn.write(data)
            if stalled.cancelled_caught:
                socket.socket.close()
                log.info("closed the connection to %s: a frame stalled for %.0f s", self.peer_id,
                         FRAME_STALL_SECONDS)
                raise MuxedConnUnavailable("a frame's write stalled")
        await trio.lowlevel.checkpoint()

    Yamux._write_frame = write_frame
    Yamux._frames_whole = True


def _rank_dialled_addrs(host: IHost) -> None:
    """py-libp2p 0.8.1 dials one TCP address per peer: the first its peerstore holds, in the
    order learnt. A home peer's LAN address, learnt first, then hid the router's forwarded one,
    and every dial of it timed out. So the peerstore hands addresses out ranked (``_dial_rank``)."""
    peerstore = host.get_peerstore()
    addrs = peerstore.addrs
    peerstore.addrs = lambda peer_id: sorted(addrs(peer_id), key=_dial_rank)


_local_networks: tuple[float, list[ipaddress.IPv4Network]] = (-math.inf, [])


def _dial_rank(addr: multiaddr.Multiaddr) -> int:
    """0: on a network of our own interfaces (the same LAN), 1: public (or not IPv4), 2: loopback,
    3: private elsewhere (another home's LAN: unroutable from here, a dial that only times out)."""
    global _local_networks
    try:
        ip = ipaddress.ip_address(addr.value_for_protocol("ip4"))
    except Exception:  # dns, ip6
        return 1
    if time.monotonic() - _local_networks[0] > 30:
        networks = [ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False) for a in _interface_ipv4_addrs()
                    if a.netmask]
        _local_networks = (time.monotonic(), networks)
    if any(ip in network for network in _local_networks[1] if not network.is_loopback):
        return 0
    return {0: 1, 2: 2}.get(reach_of(str(ip)), 3)


def _interface_ipv4_addrs() -> list:
    """psutil's IPv4 address entries (address, netmask) of the local interfaces."""
    return [a for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET]


def _interface_ipv4s() -> list[str]:
    """IPv4 addresses of the local interfaces."""
    return [a.address for a in _interface_ipv4_addrs()] or ["127.0.0.1"]


def reach_of(ip: str) -> int:
    """0: public, 1: private (a LAN, carrier-grade NAT's 100.64/10, link-local), 2: loopback."""
    address = ipaddress.ip_address(ip)
    if address.is_loopback:
        return 2
    if address.is_private or address in _SHARED or address.is_link_local:
        return 1
    return 0


_SHARED = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598, not counted private by ipaddress


def behind_router(listen: list[multiaddr.Multiaddr]) -> bool:
    """Whether a host listening on ``listen`` sits on a private network, where a home router may
    forward ports to it: a listen address, or with a wildcard an interface, that is private (not
    loopback, not public)."""
    for addr in listen:
        try:
            ip = addr.value_for_protocol("ip4")
        except Exception:  # not IPv4
            continue
        ips = _interface_ipv4s() if ip == "0.0.0.0" else [ip]
        if any(reach_of(i) == 1 for i in ips):
            return True
    return False


def advertised_addrs(candidates: list[multiaddr.Multiaddr], announce: list[multiaddr.Multiaddr] = ()
                     ) -> list[multiaddr.Multiaddr]:
    """What a host tells others to dial (Identify, the DHT, member and matchmaking entries):
    ``announce`` first (a port forward, a VPS's public address), then its listen and observed
    addresses with a wildcard expanded to every interface, public before private, loopback only
    where nothing else is. py-libp2p advertises a wildcard listen address as is, and another
    host dials 0.0.0.0 (itself) and fails."""
    expanded: list[multiaddr.Multiaddr] = []
    for addr in candidates:
        text = str(addr)
        if "/ip4/0.0.0.0/" in text:
            ips = [ip for ip in _interface_ipv4s() if reach_of(ip) < 2] or ["127.0.0.1"]
            expanded += [multiaddr.Multiaddr(text.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/")) for ip in ips]
        else:
            expanded.append(addr)

    def rank(addr: multiaddr.Multiaddr) -> int:
        try:
            return reach_of(addr.value_for_protocol("ip4"))
        except Exception:  # not an IPv4 address (dns, ip6): as if public
            return 0

    seen, out = set(), []
    for addr in [*announce, *sorted(expanded, key=rank)]:
        if str(addr) not in seen:
            seen.add(str(addr))
            out.append(addr)
    return out
