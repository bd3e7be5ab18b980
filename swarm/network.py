"""Building a libp2p host the way every Legion peer needs it: TCP, Noise only, Yamux."""

from __future__ import annotations

import fcntl
import socket
import struct

import multiaddr
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

DIAL_TIMEOUT = 5.0


def build_host(key_pair: KeyPair, psk: str | None = None, dial_timeout: float = DIAL_TIMEOUT) -> IHost:
    """A host that offers only Noise (py-libp2p's default list includes plaintext and secio).

    ``max_connections_per_peer=1`` avoids the ~250 ms stall py-libp2p 0.8.1 adds to every dial.
    ``psk`` (64 hex digits) makes the host a member of a libp2p private network.
    """
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    config = ConnectionConfig(max_connections_per_peer=1, dial_timeout=dial_timeout,
                              outbound_upgrade_timeout=dial_timeout, inbound_upgrade_timeout=dial_timeout)
    return new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise},
                    muxer_opt=create_yamux_muxer_option(), connection_config=config, psk=psk)


def _interface_ipv4s() -> list[str]:
    """IPv4 addresses of the local interfaces (Linux ioctl; loopback only elsewhere)."""
    addresses = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915,  # SIOCGIFADDR
                                     struct.pack("256s", name[:15].encode()))
                addresses.append(socket.inet_ntoa(packed[20:24]))
            except OSError:
                continue
    return addresses or ["127.0.0.1"]


def dialable_addrs(host: IHost) -> list[multiaddr.Multiaddr]:
    """The host's full addresses (with ``/p2p/<id>``), a wildcard listen address expanded to every
    local interface, loopback last."""
    result = []
    for addr in host.get_addrs():
        text = str(addr)
        if "/ip4/0.0.0.0/" in text:
            ips = sorted(_interface_ipv4s(), key=lambda ip: ip.startswith("127."))
            result.extend(multiaddr.Multiaddr(text.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/")) for ip in ips)
        else:
            result.append(addr)
    return result
