"""A Legion peer: host, DHT node, joining, and the heartbeat that keeps its announcement alive."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path

import multiaddr
import trio
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from averaging.lanes import Lanes
from averaging.matchmaking import connect_each
from bootstrap.join import connect_bootstrap_peers
from dht import RecordDHT
from swarm import resources
from swarm.identity import load_or_create_identity
from swarm.members import Announcement, live_members, member_place
from swarm.network import behind_router, build_host, look_up_unknown_peers
from swarm.port_mapping import PortMapping
from swarm.reachability import PRIVATE, PUBLIC, UNKNOWN, Reachability
from swarm.relay import CHECK_SECONDS, RelayLimitsConfig, Relays
from swarm.swarm_key import read_swarm_key

log = logging.getLogger(__name__)

VERSION = package_version("legion-swarm")
REACHABILITY_SECONDS = 60.0  # between dial-back checks once the answer is known


class ConfigError(ValueError):
    """A peer configuration that cannot work."""


@dataclass
class PeerConfig:
    """Everything a peer needs to start. Heartbeat and ttl are seconds; an announcement expires
    ``ttl_heartbeats`` heartbeats after its last refresh."""

    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    seed: bool = False
    identity: Path | None = None
    swarm_key: Path | None = None
    swarm: str = "default"
    heartbeat: float = 5.0
    ttl_heartbeats: float = 2.5
    network_timeout: float = 5.0
    upload_mbps: float | None = None
    download_mbps: float | None = None
    gpu: str | None = None
    lanes: bool = True  # bulk data (all-reduce, chunks) on direct encrypted TCP lanes (averaging.lanes)
    lane_port: int = 0  # the lane listener's TCP port (0: any free one); fix it to forward it
    announce: list[str] = field(default_factory=list)  # addresses to advertise first (port forwards, VPS)
    relay_service: bool | None = None  # relay for peers behind NAT while dialable (None: seeds only)
    relay_limits: RelayLimitsConfig = field(default_factory=RelayLimitsConfig)
    upnp: bool = True  # ask the home router (UPnP-IGD, else NAT-PMP) to forward the libp2p and lane ports (swarm.port_mapping)

    def validate(self) -> None:
        if not self.seed and not self.bootstrap:
            raise ConfigError("a peer needs --bootstrap MULTIADDR to join a swarm, or --seed to start one")
        if not 0.2 <= self.heartbeat <= 10:
            raise ConfigError(f"heartbeat {self.heartbeat}s must lie in [0.2, 10] seconds")
        if not 1 < self.ttl_heartbeats <= 3:
            raise ConfigError("announcements must expire within (1, 3] heartbeats")
        if not self.swarm.replace("-", "").replace("_", "").isalnum() or len(self.swarm) > 64:
            raise ConfigError(f"swarm name {self.swarm!r} must be 1-64 letters, digits, - or _")
        for rate in (self.upload_mbps, self.download_mbps):
            if rate is not None and not 0 < rate < 1e6:
                raise ConfigError(f"bandwidth {rate} Mbit/s is not plausible")
        for option, addrs in (("--listen", self.listen), ("--announce", self.announce)):
            for addr in addrs:
                try:
                    multiaddr.Multiaddr(addr)
                except Exception as exc:
                    raise ConfigError(f"{option} {addr!r} is not a multiaddr: {exc}") from exc
        if not 0 <= self.lane_port < 65536:
            raise ConfigError(f"lane port {self.lane_port} is not a TCP port")


class Peer:
    """Run with ``await nursery.start(peer.run)``, which returns once the peer has joined and
    announced itself; ``stop()`` makes ``run`` withdraw the announcement and return."""

    def __init__(self, config: PeerConfig, key_pair: KeyPair | None = None) -> None:
        config.validate()
        self.config = config
        self.key_pair = key_pair or load_or_create_identity(config.identity)
        psk = read_swarm_key(config.swarm_key) if config.swarm_key else None
        self._reachability_changed = trio.Event()
        self.port_mapping = PortMapping(on_change=lambda: self._reachability_changed.set())
        self.host = build_host(self.key_pair, psk=psk, dial_timeout=config.network_timeout,
                               announce=[multiaddr.Multiaddr(a) for a in config.announce],
                               mapped=lambda: self.port_mapping.addrs)
        serve = config.seed if config.relay_service is None else config.relay_service
        self.relays = Relays(self.host, serve=serve, limits=config.relay_limits)
        # a client until others' dial-backs show it can be dialled (a seed serves from the start):
        # a peer behind NAT that had served would stay in others' routing tables, costing them a
        # failed dial per request (py-libp2p's Identify push adds protocols but never removes one)
        self.dht = RecordDHT(self.host, self.key_pair, server=config.seed, timeout=config.network_timeout)
        self.lanes = Lanes(self.host, timeout=config.network_timeout)
        self.reachability = Reachability(self.host)
        # where its announcement goes: the level of its bucket of the member list follows the
        # swarm's size (a trainer's comes from the run board's reads: ``BucketPlace.adopt``)
        self.member_place = member_place(config.swarm, self.peer_id.to_base58())
        self.started_at = time.time()
        self.addrs: list[multiaddr.Multiaddr] = []
        self._stopping = trio.Event()
        self.stopped = trio.Event()

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    @property
    def ttl(self) -> float:
        return self.config.heartbeat * self.config.ttl_heartbeats

    @property
    def reach(self) -> str:
        """public, private (nobody can dial it), relayed (private, reachable through a relay) or unknown."""
        status = self.reachability.status
        return "relayed" if status == PRIVATE and self.relays.addrs else status

    def announcement(self) -> Announcement:
        declared = self.config.upload_mbps is not None or self.config.download_mbps is not None
        return Announcement(
            addrs=[str(a) for a in [*self.host.get_addrs(), *self.relays.addrs]], role="seed" if self.config.seed else "peer",
            version=VERSION, started_at=self.started_at, cpu_cores=resources.cpu_cores(),
            ram_bytes=resources.ram_bytes(), gpu=self.config.gpu or resources.gpu_name(),
            upload_mbps=self.config.upload_mbps, download_mbps=self.config.download_mbps,
            bandwidth_source="declared" if declared else "unknown", reachability=self.reach)

    async def run(self, *, task_status: trio.TaskStatus["Peer"] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            self.stopped.set()

    async def _run(self, task_status: trio.TaskStatus["Peer"]) -> None:
        listen = [multiaddr.Multiaddr(a) for a in self.config.listen]
        async with self.host.run(listen), self.dht.running(), trio.open_nursery() as nursery:
            if self.config.lanes:
                await nursery.start(self.lanes.run, self._lane_ip(listen), self.config.lane_port)
            await nursery.start(self.relays.run)
            look_up_unknown_peers(self.host, self.dht.find_peer, self.config.network_timeout)
            self.addrs = self.host.get_addrs()
            if self.config.upnp and behind_router(listen):
                ports = self._listening_ports()
                nursery.start_soon(self.port_mapping.run, [*ports, *([self.lanes.port] if self.lanes.port else [])],
                                   ports)
            if self.config.bootstrap:
                reached = await connect_bootstrap_peers(self.host, self.config.bootstrap,
                                                        self.config.network_timeout)
                for peer_id in reached:  # the first store's lookup then fills the routing table
                    await self.dht.add_peer(peer_id)
            # its level found before announcing (in a large swarm the unsplit key stays empty),
            # then checked every few heartbeats
            members = self.member_place
            with trio.move_on_after(2 * self.config.network_timeout):
                await members.follow(self.dht)
            key, value = members.own_key, self.announcement().to_value()
            await members.write(self.dht, value, self.ttl, compared=value)
            log.info("peer %s announced in swarm %r (%d in routing table)", self.peer_id,
                     self.config.swarm, self.dht.routing_table_size())
            self.reachability.serve()
            nursery.start_soon(self._check_reachability)
            task_status.started(self)
            next_beat = trio.current_time()
            while not self._stopping.is_set():
                next_beat += self.config.heartbeat
                with trio.move_on_at(next_beat):
                    await self._stopping.wait()
                if self._stopping.is_set():
                    break
                with trio.move_on_after(self.config.heartbeat):
                    await members.follow(self.dht)
                value = self.announcement().to_value()  # its reachability may be known by now
                if not members.refresh_due(value):
                    continue
                key = members.own_key
                # A slow refresh still counts while the previous entry lives (ttl - heartbeat).
                with trio.move_on_after(self.ttl - self.config.heartbeat):
                    await members.write(self.dht, value, self.ttl, compared=value)
            with trio.move_on_after(2.0):
                await self.dht.withdraw(key, self.ttl * members.refresh_beats)
                log.info("peer %s withdrew its announcement", self.peer_id)
            nursery.cancel_scope.cancel()

    async def connect_ahead(self, peers: list[str]) -> list[str]:
        """Behind NAT, connect to those of ``peers`` not connected yet, before a round needs them:
        a first connection through a relay (with its hole punch) takes seconds, and seven peers
        making theirs at once within a first round's deadline failed that round for every
        member (bench/internet.py). Addresses come from the member list; returns the peers it
        could not reach (logged), none for a peer others can dial."""
        wanted = {p for p in peers if p != self.peer_id.to_base58()
                  and not self.host.get_network().get_connections(ID.from_base58(p))}
        if self.reach == PUBLIC or not wanted:
            return []
        members = None
        with trio.move_on_after(2 * self.config.network_timeout):
            members = await live_members(self.dht, self.config.swarm, self.peer_id.to_base58())
        known = {m.peer_id: m.addrs for m in members.entries if m.peer_id in wanted} if members else {}
        failed = await connect_each(self.host, known.items(), 2 * self.config.network_timeout)
        for peer, reason in failed.items():
            log.info("cannot connect to %s ahead of its rounds: %s", peer, reason)
        return sorted(wanted - known.keys()) + sorted(failed)

    async def _check_reachability(self) -> None:
        """Whether others can dial this peer: asked soon after joining (again while no peer
        answers), then every ``REACHABILITY_SECONDS``. A peer others cannot dial uses the DHT as a
        client and keeps slots on relays (checked every ``relay.CHECK_SECONDS``)."""
        checked = -math.inf
        while True:
            if trio.current_time() - checked >= REACHABILITY_SECONDS or self.reachability.status == UNKNOWN:
                status = await self.reachability.check()
                checked = trio.current_time()
                if status != UNKNOWN:
                    await self.dht.set_server(status == PUBLIC)
            if self.reachability.status == PRIVATE:
                await self.relays.keep_reservations(self._relay_candidates())
            with trio.move_on_after(2.0 if self.reachability.status == UNKNOWN else CHECK_SECONDS):
                await self._reachability_changed.wait()
            if self._reachability_changed.is_set():  # a router now forwards a port: ask again at once
                self._reachability_changed = trio.Event()
                checked = -math.inf

    def _relay_candidates(self) -> list[ID]:
        """Peers that may relay for this one: the bootstrap peers first, then the others connected."""
        first = []
        for addr in self.config.bootstrap:
            with contextlib.suppress(Exception):
                first.append(ID.from_base58(multiaddr.Multiaddr(addr).get_peer_id()))
        return [*first, *(p for p in self.host.get_connected_peers() if p not in first)]

    def _listening_ports(self) -> list[int]:
        """The TCP ports the libp2p host listens on."""
        ports = []
        for listener in self.host.get_network().listeners.values():
            for addr in listener.get_addrs():
                with contextlib.suppress(Exception):
                    ports.append(int(addr.value_for_protocol("tcp")))
        return sorted(set(ports))

    @staticmethod
    def _lane_ip(listen: list[multiaddr.Multiaddr]) -> str:
        """The lane listener binds where libp2p listens (its first IPv4 address)."""
        for addr in listen:
            with contextlib.suppress(Exception):
                return addr.value_for_protocol("ip4")
        return "0.0.0.0"

    def stop(self) -> None:
        """Leave gracefully: withdraw the announcement, then return from ``run``. (Cancelling
        ``run`` instead stops at once and leaves the announcement to expire.)"""
        self._stopping.set()
