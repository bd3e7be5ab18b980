"""Hosts in Linux network namespaces on one bridge: separate machines for the tests, each with its
own address, so that nothing reaches another host through 127.0.0.1. Needs root and iproute2."""

from __future__ import annotations

import json
import subprocess
import uuid

from swarm.local import READY, PeerProcess, peer_command, start_process


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Lab:
    """A hub namespace holding a bridge (the "internet" of 10.201.0.0/24), and hosts on it."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.hub = f"lg{self.tag}-hub"
        self.hosts: dict[str, str] = {}  # name -> namespace
        self._routers: dict[str, str] = {}  # home -> its router's name
        self.links: dict[str, tuple[str, str, str]] = {}  # name -> (namespace, its uplink, the hub's end)
        self.processes: list[PeerProcess] = []
        _ip("netns", "add", self.hub)
        self.exec_hub("ip", "link", "add", "br0", "type", "bridge")
        self.exec_hub("ip", "link", "set", "br0", "up")

    def exec_hub(self, *command: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.hub, *command], check=True, capture_output=True)

    def add_host(self, name: str, index: int) -> str:
        """A host ``name`` at 10.201.0.``index``; returns its address."""
        ns, address = f"lg{self.tag}-{name}", f"10.201.0.{index}"
        _ip("netns", "add", ns)
        outer, inner = f"v{self.tag}{index}", f"h{self.tag}{index}"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "netns", self.hub)
        _ip("link", "set", inner, "netns", ns)
        self.exec_hub("ip", "link", "set", outer, "master", "br0")
        self.exec_hub("ip", "link", "set", outer, "up")
        for command in (["ip", "addr", "add", f"{address}/24", "dev", inner], ["ip", "link", "set", inner, "up"],
                        ["ip", "link", "set", "lo", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *command], check=True, capture_output=True)
        self.hosts[name] = ns
        self.links[name] = (ns, inner, outer)
        return address

    def shape(self, name: str, down_mbit: float, up_mbit: float) -> None:
        """Rate-limit ``name``'s access link (a home's: its router's), each way, with ``tbf``
        (this kernel has no ``netem``, so no added delay or loss)."""
        ns, uplink, hub_end = self.links.get(name) or self.links[self._routers[name]]
        for where, device, mbit in ((ns, uplink, up_mbit), (self.hub, hub_end, down_mbit)):
            subprocess.run(["ip", "netns", "exec", where, "tc", "qdisc", "replace", "dev", device, "root", "tbf",
                            "rate", f"{mbit}mbit", "burst", "64kb", "latency", "200ms"], check=True, capture_output=True)

    def add_home(self, name: str, index: int, random_ports: bool = False) -> str:
        """A host ``name`` at 192.168.``index``.10 behind a home router (WAN 10.201.0.``100 + index``)
        that masquerades, forwards no port and drops every connection not opened from inside;
        returns the router's WAN address. Linux keeps a connection's source port where it can
        (hole punching works); with ``random_ports`` every connection gets a random one, as
        symmetric and carrier-grade NATs do (hole punching fails)."""
        wan = f"10.201.0.{100 + index}"
        self.add_host(f"r{index}", 100 + index)
        router = self.hosts[f"r{index}"]
        home = f"lg{self.tag}-{name}"
        _ip("netns", "add", home)
        outer, inner = f"l{self.tag}{index}", f"m{self.tag}{index}"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "netns", router)
        _ip("link", "set", inner, "netns", home)
        wan_dev = f"h{self.tag}{100 + index}"
        for command in (["ip", "addr", "add", f"192.168.{index}.1/24", "dev", outer], ["ip", "link", "set", outer, "up"],
                        ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                        ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan_dev, "-j", "MASQUERADE",
                         *(["--random-fully"] if random_ports else [])],
                        ["iptables", "-P", "FORWARD", "DROP"],
                        ["iptables", "-A", "FORWARD", "-i", outer, "-o", wan_dev, "-j", "ACCEPT"],
                        ["iptables", "-A", "FORWARD", "-i", wan_dev, "-o", outer, "-m", "conntrack",
                         "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                        ["iptables", "-A", "INPUT", "-i", wan_dev, "-m", "conntrack", "--ctstate",
                         "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                        ["iptables", "-A", "INPUT", "-i", wan_dev, "-j", "DROP"]):
            subprocess.run(["ip", "netns", "exec", router, *command], check=True, capture_output=True)
        for command in (["ip", "addr", "add", f"192.168.{index}.10/24", "dev", inner], ["ip", "link", "set", inner, "up"],
                        ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", f"192.168.{index}.1"]):
            subprocess.run(["ip", "netns", "exec", home, *command], check=True, capture_output=True)
        self.hosts[name] = home
        self._routers[name] = f"r{index}"
        return wan

    def start_peer(self, host: str, args: list[str], log_dir, timeout: float = 60.0) -> PeerProcess:
        """``legion-peer ARGS`` on ``host``, once it printed its addresses."""
        process = start_process(["ip", "netns", "exec", self.hosts[host], *peer_command(*args)], READY,
                                log_dir=log_dir, timeout=timeout)
        match = READY.match(process.ready_lines[0])
        process.peer_ids.append(match.group(2))
        process.addrs.extend(match.group(3).split())
        self.processes.append(process)
        return process

    def status(self, host: str, bootstrap: str) -> list[dict]:
        """``legion-peer status --json`` run on ``host``."""
        done = subprocess.run(["ip", "netns", "exec", self.hosts[host],
                               *peer_command("status", "--bootstrap", bootstrap, "--json", "--quiet")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        for ns in [*self.hosts.values(), self.hub]:
            _ip("netns", "delete", ns, check=False)

