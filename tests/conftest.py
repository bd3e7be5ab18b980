import pytest

from swarm.local import start_peer_process

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
