"""A swarm trains a GPT together: real peer processes on 127.0.0.1, real torch training."""

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from swarm.local import peer_command, start_training_swarm, status_json, training_summary

RUN = ["--model", "tiny", "--inner-steps", "10", "--batch-size", "8"]


def metrics(out, peer):
    path = out / f"peer{peer}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_round(out, peer, round_, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("round", -1) >= round_ and r["event"] == "round" for r in metrics(out, peer)):
            return
        time.sleep(0.2)
    raise AssertionError(f"peer {peer} did not reach round {round_}")


def test_four_peers_in_groups_of_two_train_together_and_end_with_the_same_lower_loss(tmp_path):
    """More peers than a group holds: each round's two groups reduce across each other (two-level
    rounds), so all four hold one set of weights; before, each group kept its own mean and the
    swarm's weights parted."""
    run = tmp_path / "run.toml"
    run.write_text('model = "tiny"\ninner_steps = 10\nbatch_size = 8\nrounds = 4\ngroup_size = 2\n')
    processes = start_training_swarm(4, ["--run", str(run)], tmp_path)
    try:
        summaries = [training_summary(p, 240) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for s in summaries:
        assert s["round"] == 4
        assert s["val_loss"] < s["initial_val_loss"] - 1.0  # 5.4 (uniform-ish) down to about 3
        # (4 of 4 in 20 of 20 peer-runs here; one may be missed on a loaded machine. Before two
        # matchmaking fixes, 2 peers missed 1 or 2 rounds in 7 of 13 runs: one split with its own
        # moved coordinates, one read 3 of 4 seekers and then waited out its budget)
        assert s["rounds_averaged"] >= 3 and s["bytes_sent"] > 0
    # the swarm weights are identical on every peer: identical validation loss
    assert max(s["val_loss"] for s in summaries) - min(s["val_loss"] for s in summaries) < 1e-6
    # and the peers of both groups trained them: at most one adopted them at the end (with a group's
    # own mean each round, two groups of two end with two sets of weights, and two peers adopt)
    assert sum(s["final_weights"] == "own" for s in summaries) >= 3
    # int8 pseudo-gradients: about 1 byte per parameter per round (0.83M parameters), not 4
    assert max(s["bytes_sent"] for s in summaries) < 4 * 1.3e6


@pytest.mark.slow  # ~55 s; tests/test_chaos.py's restart faults cover a kill -9 and a restart from the same disk
def test_a_killed_peer_does_not_stop_the_others_and_resumes_from_disk_when_restarted(tmp_path, spawn):
    processes = start_training_swarm(3, [*RUN, "--rounds", "12"], tmp_path)
    try:
        wait_for_round(tmp_path, 2, 2)
        processes[2].kill()
        # with a start barrier it cannot meet (2 peers alive, the killed one's stale entry and itself make
        # at most 4): the run is past its start, so it must not wait
        restarted = spawn(["--bootstrap", processes[0].addrs[0], "--listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
                           "--out", str(tmp_path / "peer2"), "--wait-peers", "5"], train=True)
        summaries = [training_summary(p, 300) for p in [*processes[:2], restarted]]
    finally:
        for p in processes:
            p.kill()
    assert all(s["round"] == 12 for s in summaries)
    assert all(s["val_loss"] < summaries[0]["initial_val_loss"] - 1.0 for s in summaries)
    assert summaries[2]["initial_val_loss"] < summaries[0]["initial_val_loss"] - 1.0  # restarted trained
    assert max(s["val_loss"] for s in summaries) - min(s["val_loss"] for s in summaries) < 1e-6
    assert min(s["rounds_averaged"] for s in summaries[:2]) >= 8
    # The restarted peer took its own checkpoint from disk, then the swarm's newer state as chunks
    # (DiLoCo changes every tensor each round, so nothing of the old version is reused here)
    states = [r for r in metrics(tmp_path, 2) if r["event"] == "state"]
    assert states[0]["source"] == "disk"
    fetched = [r for r in states if r["source"] == "swarm"]
    assert fetched and fetched[0]["round"] > states[0]["round"]
    # (bytes received twice are the endgame's: the last chunks asked from a second peer too)
    got = fetched[0]["bytes_received"] - fetched[0]["duplicate_bytes"]
    assert got == fetched[0]["size_bytes"] - fetched[0]["reused_bytes"] > 0


@pytest.mark.slow
def test_a_late_joiner_fetches_the_state_catches_up_and_contributes(tmp_path, spawn):
    # rounds of 30 steps (a few seconds): long next to a state transfer, as real rounds are
    processes = start_training_swarm(2, ["--model", "tiny", "--inner-steps", "30", "--batch-size", "8",
                                         "--rounds", "12"], tmp_path)
    try:
        wait_for_round(tmp_path, 0, 2)
        late = spawn(["--bootstrap", processes[0].addrs[0], "--listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
                      "--out", str(tmp_path / "peer2")], train=True)
        joined = training_summary(late, 300)
        summaries = [training_summary(p, 120) for p in processes]
    finally:
        for p in processes:
            p.kill()
    events = metrics(tmp_path, 2)
    first = next(r for r in events if r["event"] == "start")
    assert first["round"] >= 2  # started from the swarm's state, not round 0
    assert events[0]["event"] == "state" and events[0]["source"] == "swarm" and events[0]["round"] == first["round"]
    assert first["val_loss"] < summaries[0]["initial_val_loss"] - 1.0
    # it joins the swarm's averaging within a round or two of its start (round 4-5 here), and costs
    # the others no round: they wait for it only while it is on its way
    assert joined["round"] == 12 and joined["rounds_averaged"] >= 4
    assert all(s["rounds_failed"] == 0 for s in summaries)
    assert abs(joined["val_loss"] - summaries[0]["val_loss"]) < 1e-6
    groups = [r["group_size"] for r in metrics(tmp_path, 0) if r["event"] == "round"]
    assert 3 in groups  # the joiner took part in averaging rounds


@pytest.mark.slow  # ~55 s; tests/test_shards.py covers a killed owner's momentum handover in-process
def test_sharded_momentum_survives_a_killed_owner_and_status_shows_the_owners(tmp_path):
    """Three peers hold the outer momentum in 16 shards, two replicas each; one is killed: the
    others take over its shards from the surviving replicas, lose no momentum and end identical."""
    processes = start_training_swarm(3, [*RUN, "--rounds", "14", "--sharded", "--outer-momentum", "0.5"], tmp_path)
    try:
        wait_for_round(tmp_path, 2, 2)
        runs = status_json(processes[0].addrs[0], "--shards")
        assert len(runs) == 1 and len(runs[0]["shards"]) == 16
        live = {p.peer_ids[0] for p in processes}
        assert all(len(s["owners"]) == 2 and {o["peer_id"] for o in s["owners"]} <= live for s in runs[0]["shards"])
        processes[2].kill()
        killed = time.monotonic()
        lease = 2.5 * 2.0  # heartbeats of 2 s
        while processes[2].peer_ids[0] in {o["peer_id"] for s in status_json(processes[0].addrs[0], "--shards")[0]
                                            ["shards"] for o in s["owners"]}:
            assert time.monotonic() - killed < 2 * lease + 5  # two leases, and a status process's start-up
        summaries = [training_summary(p, 300) for p in processes[:2]]
    finally:
        for p in processes:
            p.kill()
    assert all(s["round"] == 14 and s["val_loss"] < s["initial_val_loss"] - 1.0 for s in summaries)
    assert abs(summaries[0]["val_loss"] - summaries[1]["val_loss"]) < 1e-6
    assert all(s["momentum_lost"] == 0 for s in summaries)
    assert sum(s["momentum_handovers"] for s in summaries) > 0  # the killed peer's shards moved
    # with two peers left, each holds the whole momentum: 16 shards of the 0.83M-parameter model
    assert all(s["outer_state_bytes"] == 4 * 834_304 for s in summaries)


def run_cli(*args, timeout=120):
    return subprocess.run(peer_command(*args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_bad_data_and_run_configurations_are_clear_errors(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("model = \n")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('model = "tiny"\nlearning_rate = 1.0\n')
    cases = [
        (["--data", str(tmp_path / "missing")], "no such file or directory"),
        (["--data", str(empty_dir)], "holds no files"),
        (["--data", str(empty_file)], "no text found"),
        (["--run", str(bad_toml)], "not valid TOML"),
        (["--run", str(unknown)], "unknown key(s) learning_rate"),
        (["--run", str(tmp_path / "none.toml")], "No such file"),
        (["--model", "huge"], "model 'huge' is not one of"),
        (["--algorithm", "adam"], "algorithm 'adam'"),
        (["--codec", "zip"], "codec"),
        (["--inner-steps", "0"], "inner_steps must be positive"),
        (["--lr-schedule", "linear"], "lr_schedule 'linear' is not one of constant, cosine"),
        (["--algorithm", "sync", "--sharded"], "sharded runs are DiLoCo runs"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    ]
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda case: run_cli("--seed", "--listen", "/ip4/127.0.0.1/tcp/0", *case[0]), cases))
    for (args, message), done in zip(cases, runs):
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr[-2000:])
