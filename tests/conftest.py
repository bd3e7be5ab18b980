import os
import shutil

import pytest
import torch
from hypothesis import settings

from netns_helpers import Lab
from swarm.local import start_peer_process

# The fuzz tests' budget: "ci" keeps the suite fast; HYPOTHESIS_PROFILE=long is the longer run
settings.register_profile("ci", max_examples=150, deadline=None)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.register_profile("medium", max_examples=2_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# In-process peers (several trainers in this process, each stepping torch off the event loop) on
# one intra-op thread each, as the CLI's --threads 1: two each oversubscribed the 2 cores
torch.set_num_threads(1)

HEARTBEAT = 2.0  # seconds; announcements expire after 2.5 heartbeats


@pytest.fixture
def spawn(tmp_path):
    """Start peer processes that are all stopped (SIGKILL if need be) when the test ends. They only
    take part in the DHT (``--no-train``) unless ``train=True``."""
    started = []

    def start(args, count=1, train=False, **kwargs):
        process = start_peer_process(["--heartbeat", str(HEARTBEAT), *([] if train else ["--no-train"]), *args], count,
                                     log_dir=tmp_path / "logs", **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def seed(spawn):
    return spawn(["--seed", "--listen", "/ip4/127.0.0.1/tcp/0"])


@pytest.fixture
def lab():
    """Hosts in network namespaces (``netns_helpers.Lab``), removed after the test."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        pytest.skip("network namespaces need root, iproute2 and iptables (CI runs as root; .ci/run installs them)")
    network = Lab()
    yield network
    network.close()


@pytest.fixture
def upnp_lab(lab):
    """A lab whose "internet" has public-looking addresses, for home routers that run miniupnpd
    (which forwards nothing on a private WAN address)."""
    if shutil.which("miniupnpd") is None or shutil.which("nft") is None:
        pytest.skip("a UPnP router needs miniupnpd and nft (.ci/run installs them)")
    lab.close()
    network = Lab(internet="11.201.0")
    yield network
    network.close()
