"""Hosts in Linux network namespaces on one bridge: separate machines for the tests, each with its
own address, so that nothing reaches another host through 127.0.0.1. Needs root and iproute2."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from swarm.local import READY, PeerProcess, peer_command, start_process


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Lab:
    """A hub namespace holding a bridge (the "internet" of 10.201.0.0/24), and hosts on it."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.hub = f"lg{self.tag}-hub"
        self.hosts: dict[str, str] = {}  # name -> namespace
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
        return address

    def start_peer(self, host: str, args: list[str], log_dir, timeout: float = 60.0) -> PeerProcess:
        """``legion-peer ARGS`` on ``host``, once it printed its addresses."""
        process = start_process(["ip", "netns", "exec", self.hosts[host], *peer_command(*args)], READY,
                                log_dir=log_dir, timeout=timeout)
        match = READY.match(process.ready_lines[0])
        process.peer_ids.append(match.group(2))
        process.addrs.extend(match.group(3).split())
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        for ns in [*self.hosts.values(), self.hub]:
            _ip("netns", "delete", ns, check=False)


@pytest.fixture
def lab():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (CI runs as root; .ci/run installs iproute2)")
    lab = Lab()
    yield lab
    lab.close()
