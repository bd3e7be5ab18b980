"""Hosts in Linux network namespaces on one bridge: separate machines for the tests, each with its
own address, so that nothing reaches another host through 127.0.0.1. Needs root and iproute2."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from swarm.local import READY, PeerProcess, peer_command, start_process


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


# nftables chains miniupnpd (its nftables build, Debian's default) adds its forwards to
_MINIUPNPD_NFT = """table inet filter {
    chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
    chain miniupnpd { }
    chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
    chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
    chain prerouting_miniupnpd { }
    chain postrouting_miniupnpd { }
}
"""


class Lab:
    """A hub namespace holding a bridge (the "internet", ``internet``.0/24: 10.201.0 unless told;
    a home router with UPnP needs a public-looking one, as miniupnpd maps nothing on a private WAN
    address), and hosts on it."""

    def __init__(self, internet: str = "10.201.0") -> None:
        self.internet = internet
        self.tag = uuid.uuid4().hex[:6]
        self.hub = f"lg{self.tag}-hub"
        self.hosts: dict[str, str] = {}  # name -> namespace
        self._routers: dict[str, str] = {}  # home -> its router's name
        self.links: dict[str, tuple[str, str, str]] = {}  # name -> (namespace, its uplink, the hub's end)
        self.processes: list[PeerProcess] = []
        self._daemons: list[subprocess.Popen] = []  # miniupnpd on routers
        self._files = tempfile.TemporaryDirectory(prefix="legion-lab-")
        _ip("netns", "add", self.hub)
        self.exec_hub("ip", "link", "add", "br0", "type", "bridge")
        self.exec_hub("ip", "link", "set", "br0", "up")

    def exec_hub(self, *command: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.hub, *command], check=True, capture_output=True)

    def add_host(self, name: str, index: int) -> str:
        """A host ``name`` at ``internet``.``index``; returns its address."""
        ns, address = f"lg{self.tag}-{name}", f"{self.internet}.{index}"
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

    def add_home(self, name: str, index: int, random_ports: bool = False, upnp: bool = False, natpmp: bool = False,
                 cgnat: bool = False) -> str:
        """A host ``name`` at 192.168.``index``.10 behind a home router (WAN ``internet``.``100 + index``)
        that masquerades, forwards no port and drops every connection not opened from inside;
        returns the router's WAN address. Linux keeps a connection's source port where it can
        (hole punching works); with ``random_ports`` every connection gets a random one, as
        symmetric NATs do (hole punching fails). With ``upnp`` the router runs miniupnpd (UPnP-IGD
        and NAT-PMP): hosts inside may forward ports >= 1024 to themselves; with ``natpmp`` alone
        it speaks only NAT-PMP. With ``cgnat`` the router's WAN is 100.64.``index``.2 at a
        carrier-grade NAT (``internet``.``150 + index``, the address returned) that masquerades
        again, port-random, and lets nothing in."""
        router_name = f"r{index}"
        if cgnat:
            wan = self._add_carrier_nat(index)
            router = f"lg{self.tag}-{router_name}"
            _ip("netns", "add", router)
            outer, inner = f"k{self.tag}{index}", f"w{self.tag}{index}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "netns", self.hosts[f"c{index}"])
            _ip("link", "set", inner, "netns", router)
            for where, command in ((self.hosts[f"c{index}"], ["ip", "addr", "add", f"100.64.{index}.1/24", "dev", outer]),
                                   (self.hosts[f"c{index}"], ["ip", "link", "set", outer, "up"]),
                                   (router, ["ip", "addr", "add", f"100.64.{index}.2/24", "dev", inner]),
                                   (router, ["ip", "link", "set", inner, "up"]),
                                   (router, ["ip", "link", "set", "lo", "up"]),
                                   (router, ["ip", "route", "add", "default", "via", f"100.64.{index}.1"])):
                subprocess.run(["ip", "netns", "exec", where, *command], check=True, capture_output=True)
            self.hosts[router_name] = router
            wan_dev = inner
        else:
            wan = f"{self.internet}.{100 + index}"
            self.add_host(router_name, 100 + index)
            router = self.hosts[router_name]
            wan_dev = f"h{self.tag}{100 + index}"
        home = f"lg{self.tag}-{name}"
        _ip("netns", "add", home)
        outer, inner = f"l{self.tag}{index}", f"m{self.tag}{index}"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "netns", router)
        _ip("link", "set", inner, "netns", home)
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
        if upnp or natpmp:
            self._run_miniupnpd(router, index, wan_dev, outer, upnp)
        for command in (["ip", "addr", "add", f"192.168.{index}.10/24", "dev", inner], ["ip", "link", "set", inner, "up"],
                        ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", f"192.168.{index}.1"]):
            subprocess.run(["ip", "netns", "exec", home, *command], check=True, capture_output=True)
        self.hosts[name] = home
        self._routers[name] = f"c{index}" if cgnat else router_name  # whose link ``shape`` limits
        return wan

    def _add_carrier_nat(self, index: int) -> str:
        """A carrier-grade NAT ``c<index>`` on the internet, masquerading 100.64.``index``.0/24 with
        a random port per connection and letting in only what was opened from inside."""
        address = self.add_host(f"c{index}", 150 + index)
        carrier, wan_dev = self.hosts[f"c{index}"], f"h{self.tag}{150 + index}"
        for command in (["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                        ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan_dev, "-j", "MASQUERADE", "--random-fully"],
                        ["iptables", "-P", "FORWARD", "DROP"],
                        ["iptables", "-A", "FORWARD", "-o", wan_dev, "-j", "ACCEPT"],
                        ["iptables", "-A", "FORWARD", "-i", wan_dev, "-m", "conntrack", "--ctstate",
                         "ESTABLISHED,RELATED", "-j", "ACCEPT"]):
            subprocess.run(["ip", "netns", "exec", carrier, *command], check=True, capture_output=True)
        return address

    def _run_miniupnpd(self, router: str, index: int, wan_dev: str, lan_dev: str, upnp: bool) -> None:
        """miniupnpd on ``router``: its forwards are DNAT rules in its own nftables chains, which the
        router's FORWARD chain lets through (``--ctstate DNAT``), as home routers do."""
        folder = Path(self._files.name)
        (folder / "miniupnpd.nft").write_text(_MINIUPNPD_NFT)
        config = folder / f"miniupnpd-{index}.conf"
        config.write_text(f"ext_ifname={wan_dev}\nlistening_ip={lan_dev}\nhttp_port=0\nenable_natpmp=yes\n"
                          f"enable_upnp={'yes' if upnp else 'no'}\nsecure_mode=yes\nsystem_uptime=yes\nuuid={uuid.uuid4()}\n"
                          f"allow 1024-65535 192.168.{index}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n")
        for command in (["nft", "-f", str(folder / "miniupnpd.nft")],
                        ["iptables", "-I", "FORWARD", "-i", wan_dev, "-o", lan_dev, "-m", "conntrack",
                         "--ctstate", "DNAT", "-j", "ACCEPT"]):
            subprocess.run(["ip", "netns", "exec", router, *command], check=True, capture_output=True)
        log = open(folder / f"miniupnpd-{index}.log", "wb")
        # its own pid file: with the default one, a miniupnpd left running by an interrupted lab
        # (or another router's) makes this one exit at once, and no forward is ever made
        self._daemons.append(subprocess.Popen(["ip", "netns", "exec", router, "miniupnpd", "-f", str(config), "-d",
                                               "-P", str(folder / f"miniupnpd-{index}.pid")],
                                              stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def command(self, host: str, *command: str) -> list[str]:
        """``command`` run on ``host``."""
        return ["ip", "netns", "exec", self.hosts[host], *command]

    def start_peer(self, host: str, args: list[str], log_dir, timeout: float = 60.0) -> PeerProcess:
        """``legion-peer ARGS`` on ``host``, once it printed its addresses."""
        process = start_process(self.command(host, *peer_command(*args)), READY, log_dir=log_dir, timeout=timeout)
        match = READY.match(process.ready_lines[0])
        process.peer_ids.append(match.group(2))
        process.addrs.extend(match.group(3).split())
        self.processes.append(process)
        return process

    def status(self, host: str, bootstrap: str) -> list[dict]:
        """``legion-peer status --json`` run on ``host``; tried three times, as a user would retry (on
        2 cores a peer starting to train can miss a status client's 5 s dial)."""
        for attempt in range(3):
            done = subprocess.run(self.command(host, *peer_command("status", "--bootstrap", bootstrap, "--json",
                                                                   "--quiet")),
                                  capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                return json.loads(done.stdout)
            time.sleep(2)
        raise AssertionError(done.stderr[-2000:])

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        for daemon in self._daemons:
            daemon.kill()
            daemon.wait()
        self._files.cleanup()
        for ns in [*self.hosts.values(), self.hub]:
            _ip("netns", "delete", ns, check=False)

