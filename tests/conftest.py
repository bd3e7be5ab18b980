import pytest

from swarm.local import start_peer_process

HEARTBEAT = 2.0  # seconds; announcements expire after 2.5 heartbeats


@pytest.fixture
def spawn(tmp_path):
    """Start peer processes that are all stopped (SIGKILL if need be) when the test ends."""
    started = []

    def start(args, count=1, **kwargs):
        process = start_peer_process(["--heartbeat", str(HEARTBEAT), *args], count,
                                     log_dir=tmp_path / "logs", **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def seed(spawn):
    return spawn(["--seed", "--listen", "/ip4/127.0.0.1/tcp/0"])
