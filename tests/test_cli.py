"""``legion-peer`` as a user runs it: identities, private swarms, bad input, clean shutdown."""

import os
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from swarm.local import PeerProcessError, peer_command, status_json


def run_cli(*args, timeout=60):
    return subprocess.run(peer_command(*args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_restart_with_the_same_identity_keeps_the_peer_id(seed, spawn, tmp_path):
    identity = tmp_path / "id.key"
    first = spawn(["--bootstrap", seed.addrs[0], "--identity", str(identity)])
    assert stat.S_IMODE(os.stat(identity).st_mode) == 0o600
    assert first.terminate() == 0
    second = spawn(["--bootstrap", seed.addrs[0], "--identity", str(identity)])
    assert second.peer_ids == first.peer_ids
    other = spawn(["--bootstrap", seed.addrs[0]])
    assert other.peer_ids != first.peer_ids


def test_a_corrupt_identity_file_is_a_clear_error(tmp_path):
    identity = tmp_path / "id.key"
    identity.write_bytes(b"nonsense")
    done = run_cli("--seed", "--identity", str(identity))
    assert done.returncode == 2
    assert "not a Legion identity file" in done.stderr and "Traceback" not in done.stderr


def test_unreachable_bootstrap_addresses_give_a_clear_error_naming_each():
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
    started = time.monotonic()
    done = run_cli("--bootstrap", dead, "--bootstrap", "/ip4/127.0.0.1/tcp/9")
    assert done.returncode == 2
    assert "could not reach any bootstrap peer" in done.stderr
    assert dead in done.stderr and "/p2p/<peer id>" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


def test_a_peer_needs_bootstrap_or_seed():
    done = run_cli()
    assert done.returncode == 2 and "--bootstrap" in done.stderr and "--seed" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--seed", "--heartbeat", "60"], "heartbeat"),
    (["--seed", "--listen", "not-an-address"], "not a multiaddr"),
    (["--seed", "--count", "2", "--listen", "/ip4/127.0.0.1/tcp/4555"], "port 0"),
    (["--seed", "--swarm", "bad name!"], "swarm name"),
])
def test_wrong_configuration_is_a_clear_error(args, message):
    done = run_cli(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # ~25 s
def test_a_private_swarm_admits_only_peers_with_its_key(spawn, tmp_path):
    key, other_key = tmp_path / "swarm.key", tmp_path / "other.key"
    assert run_cli("new-swarm-key", str(key)).returncode == 0
    assert run_cli("new-swarm-key", str(other_key)).returncode == 0
    assert run_cli("new-swarm-key", str(key)).returncode == 2  # never overwrites
    private = ["--swarm-key", str(key)]
    seed = spawn(["--seed", "--listen", "/ip4/127.0.0.1/tcp/0", *private])
    member = spawn(["--bootstrap", seed.addrs[0], *private])

    def status_refused(outsider):
        with pytest.raises(PeerProcessError):
            status_json(seed.addrs[0], *outsider)

    outsiders = ([], ["--swarm-key", str(other_key)])
    with ThreadPoolExecutor(4) as pool:  # each waits out a dial timeout: at once, not one after another
        joins = [pool.submit(run_cli, "--bootstrap", seed.addrs[0], *outsider) for outsider in outsiders]
        statuses = [pool.submit(status_refused, outsider) for outsider in outsiders]
        for future in statuses:
            future.result()
        for future in joins:
            done = future.result()
            assert done.returncode == 2 and "could not reach any bootstrap peer" in done.stderr

    listed = {p["peer_id"] for p in status_json(seed.addrs[0], *private)}
    assert listed == {seed.peer_ids[0], member.peer_ids[0]}


def test_sigterm_shuts_down_within_seconds_with_exit_0(seed, spawn):
    peer = spawn(["--bootstrap", seed.addrs[0]], count=3)
    started = time.monotonic()
    assert peer.terminate(timeout=15) == 0
    assert time.monotonic() - started < 8
    log = peer.log_tail(100)
    assert "Traceback" not in log and "withdrew its announcement" in log
    assert {p["peer_id"] for p in status_json(seed.addrs[0])} == set(seed.peer_ids)


def test_status_json_reports_declared_resources(seed, spawn):
    spawn(["--bootstrap", seed.addrs[0], "--upload-mbps", "20", "--download-mbps", "100", "--gpu", "RTX 4090"])
    [entry] = [p for p in status_json(seed.addrs[0]) if p["role"] == "peer"]
    assert (entry["upload_mbps"], entry["download_mbps"], entry["gpu"]) == (20, 100, "RTX 4090")
    assert entry["bandwidth_source"] == "declared" and entry["version"]
    table = run_cli("status", "--bootstrap", seed.addrs[0], "--quiet").stdout
    assert "RTX 4090" in table and "20.0/100.0 (declared)" in table and "2 live peer(s)" in table


def test_every_package_imports_where_fcntl_does_not_exist():
    """Windows has no fcntl: importing the library there must not fail on it."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import swarm.cli, swarm.trainer, swarm.network, swarm.resources, averaging.averager, bootstrap.checkpoint_swarm, "
            "shards.outer, dht, optim.diloco, swarm.metrics, swarm.web, swarm.swarm_view, swarm.demo\n"
            "from swarm import resources\n"
            "assert resources.ram_bytes() > 0 and 0 < resources.available_memory() <= resources.ram_bytes()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
