"""Peers whose last rounds ended differently settle on one set of final weights at the end of a run;
peers parted into lineages mid-run merge."""

import json
import threading

import pytest
import trio

from optim.base import weights_digest
from peer_helpers import start_peers
from swarm.final_weights import agreed_digest, outnumbering, settled_digest
from swarm.run_config import RunConfig
from swarm.trainer import Trainer


def test_the_digest_most_peers_hold_wins_and_ties_go_to_the_smaller():
    assert agreed_digest("aa", {"p": "bb", "q": "bb"}) == "bb"
    assert agreed_digest("bb", {"p": "aa", "q": "bb"}) == "bb"
    assert agreed_digest("bb", {"p": "aa"}) == "aa"  # one other peer: its word is enough
    assert agreed_digest("aa", {"p": "bb"}) == "aa"
    assert agreed_digest("cc", {"p": "aa", "q": "bb"}) == "cc"  # nobody else backs another digest


def test_a_latecomer_takes_only_final_weights_two_peers_hold():
    assert settled_digest({"p": "bb", "q": "bb", "r": "aa"}) == "bb"
    assert settled_digest({"p": "bb", "q": "bb", "r": "aa", "s": "aa"}) == "aa"  # a tie: the smaller
    assert settled_digest({"p": "aa"}) is None  # one peer's word
    assert settled_digest({"p": "aa", "q": "bb"}) is None


def test_one_peer_cannot_outvote_with_weights_it_made_up():
    # three others: a digest that only one of them claims is not a candidate, however small
    assert agreed_digest("bb", {"p": "00", "q": "cc", "r": "dd"}) == "bb"


def test_a_peer_of_the_smaller_lineage_is_told_whom_to_take_the_weights_from():
    own = {4: "a4", 5: "a5"}
    assert outnumbering(own, {"p": (5, "b5"), "q": (4, "b4"), "s": (5, "b5"), "r": (5, "a5")}, "m") == ["p", "q", "s"]
    assert outnumbering(own, {"p": (5, "b5"), "q": (4, "b4")}, "m") == ["p", "q"]  # 2 against this peer alone
    assert outnumbering(own, {"p": (5, "b5"), "q": (4, "b4"), "r": (5, "a5"), "s": (4, "a4")}, "m") == []  # 2 against 3
    assert outnumbering(own, {"p": (5, "b5")}, "m") == []  # one other peer's word is not enough
    assert outnumbering(own, {"p": (3, "b3"), "q": (6, "b6"), "r": (2, "b2")}, "m") == []  # not at this peer's rounds
    # each peer counts once, at its latest entry: a lineage that just moved still shows its old
    # entries, yet never outnumbers the one it moved to
    lineage_a, lineage_b = {"a1", "a2", "a3"}, {"b1", "b2"}
    board = {**{p: (5, "a5") for p in lineage_a}, **{p: (4, "b4") for p in lineage_b}}
    moving = [peer for peer in sorted(board)
              if outnumbering({4: "b4", 5: "b5"} if peer in lineage_b else {4: "a4", 5: "a5"},
                              {p: entry for p, entry in board.items() if p != peer}, peer)]
    assert moving == ["b1", "b2"]


def test_of_two_lineages_alike_in_number_the_one_without_the_smallest_peer_id_moves():
    """Two pairs a healed partition left apart averaged in pairs to the end of a chaos run."""
    own = {4: "a4", 5: "a5"}
    assert outnumbering(own, {"p": (5, "b5"), "q": (5, "b5"), "r": (4, "a4")}, "s") == ["p", "q"]
    assert outnumbering(own, {"p": (5, "b5"), "q": (5, "b5"), "r": (4, "a4")}, "c") == []  # "c" < "p": this lineage stays
    assert outnumbering(own, {"p": (5, "b5"), "q": (5, "c5"), "r": (4, "a4")}, "s") == []  # two lineages of one each
    # each side sees the other at whatever round: exactly one pair moves, whoever compares when
    pairs = {"a1": {4: "a4", 5: "a5"}, "a2": {4: "a4", 5: "a5"}, "b1": {4: "b4", 5: "b5"}, "b2": {4: "b4", 5: "b5"}}
    for rounds in ({"a1": 5, "a2": 4, "b1": 4, "b2": 5}, {"a1": 4, "a2": 4, "b1": 5, "b2": 5}):
        moving = [peer for peer, bases in pairs.items()
                  if outnumbering(bases, {p: (rounds[p], pairs[p][rounds[p]]) for p in pairs if p != peer}, peer)]
        assert moving == ["b1", "b2"]


def last_round_apart(train):
    """``Trainer._train`` with the swarm weights changed after the last round, as if that round
    had gone otherwise for this peer."""
    def trained_apart(model, corpus, optimizer):
        summary = train(model, corpus, optimizer)
        optimizer.global_weights.add_(1e-3)
        optimizer.finish()
        return summary
    return trained_apart


async def train_all(trainers: list[Trainer]) -> list[dict]:
    """Run every trainer to its end; their summaries."""
    summaries: list[dict] = [{}] * len(trainers)

    async def run(index):
        summaries[index] = await trainers[index].run()

    with trio.fail_after(150):
        async with trio.open_nursery() as training:
            for index in range(len(trainers)):
                training.start_soon(run, index)
    return summaries


async def test_a_peer_whose_last_round_failed_adopts_the_weights_the_others_hold(tmp_path):
    """Faults injected at chosen points: one peer's weights are changed after its last round (as if
    that round had failed for it alone). At the end all three hold the same weights, on disk too.
    And another peer is told after round 0 that it is out of sync while it holds the swarm's
    weights (as every peer is after a round that failed for all): it fetches nothing. Before, it
    fetched a state of its own round with its own weights, and another peer's inner optimizer
    state with them."""
    config = RunConfig(model="tiny", inner_steps=5, batch_size=8, rounds=3, round_timeout=20)
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        trainers = [Trainer(peer, config, out=tmp_path / f"peer{i}", wait_peers=3) for i, peer in enumerate(peers)]
        trainers[2]._train = last_round_apart(trainers[2]._train)
        out_of_sync_after_round(trainers[1], 0)
        # the others apply round 1 only once it has looked: it finds them at its own round
        looked = threading.Event()
        record = trainers[1]._record

        def recording(event):
            record(event)
            if event.get("event") in ("in_sync", "state"):
                looked.set()
        trainers[1]._record = recording
        for trainer in (trainers[0], trainers[2]):
            hold_round(trainer, 1, looked)
        summaries = await train_all(trainers)
        nursery.cancel_scope.cancel()
    records = metrics(tmp_path / "peer1")
    assert [r["event"] for r in records if r["event"] in ("in_sync", "state")] == ["in_sync"], records
    assert [s["final_weights"] for s in summaries] == ["own", "own", "adopted"], summaries
    digests = {weights_digest(t.optimizer.global_weights) for t in trainers}
    assert len(digests) == 1
    assert len({s["val_loss"] for s in summaries}) == 1
    # what a restart of the adopting peer resumes from: the agreed weights, signed by itself
    saved = trainers[2].store.complete(config.run_id)[0]
    assert saved.signer == trainers[2].me
    assert weights_digest(trainers[2].store.load(saved)["weights"]) == digests.pop()


async def test_a_peer_out_of_sync_and_a_round_ahead_of_the_others_takes_their_state_of_their_round(tmp_path):
    """Faults injected at chosen points: after round 0 one of three peers holds other weights and is
    out of sync (as after rounds it stepped alone), a round ahead of the other two, which are held
    at their round 0 until it has looked. No state of its own round is coming in time, so it takes
    theirs of round 0, going back a round, and all three end alike. Before, it waited for a state
    of its own round, gave up, and stayed a round ahead of the others to the end of a chaos run,
    failing every round (``bench/chaos.py --churn 0.5 --partition --seed 2``, 2026-12-06)."""
    config = RunConfig(model="tiny", inner_steps=5, batch_size=8, rounds=2, round_timeout=10)
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        trainers = [Trainer(peer, config, out=tmp_path / f"peer{i}", wait_peers=3) for i, peer in enumerate(peers)]
        ahead = trainers[2]
        apart_after_round(ahead, 0)
        out_of_sync_after_round(ahead, 0)
        looked = threading.Event()
        record = ahead._record

        def recording(event):
            record(event)
            if event.get("event") in ("in_sync", "state"):
                looked.set()
        ahead._record = recording
        for trainer in trainers[:2]:
            hold_round(trainer, 0, looked)
        summaries = await train_all(trainers)
        nursery.cancel_scope.cancel()
    fetched = [r for r in metrics(tmp_path / "peer2") if r["event"] in ("in_sync", "state")]
    assert fetched and fetched[0]["event"] == "state" and fetched[0]["round"] == 0, fetched
    assert len({weights_digest(t.optimizer.global_weights) for t in trainers}) == 1, summaries


async def train_with_the_last_apart(tmp_path, count: int, apart: int) -> tuple[list[Trainer], list[dict], list[list[dict]]]:
    """``count`` peers train 6 rounds, the last ``apart`` of them changing their weights alike after
    round 1; the trainers, their summaries and their metrics lines."""
    config = RunConfig(model="tiny", inner_steps=5, batch_size=8, rounds=6, round_timeout=30)
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, count)
        trainers = [Trainer(peer, config, out=tmp_path / f"peer{i}", wait_peers=count) for i, peer in enumerate(peers)]
        for trainer in trainers[count - apart:]:
            apart_after_round(trainer, 1)
        summaries = await train_all(trainers)
        nursery.cancel_scope.cancel()
    return trainers, summaries, [metrics(tmp_path / f"peer{i}") for i in range(count)]


@pytest.mark.slow  # ~28 s; lineages parted by a partition merge in the chaos test (its partition fault)
async def test_peers_parted_into_two_lineages_that_both_average_merge_mid_run(tmp_path):
    """Fault injected at a chosen point: after round 1 two of five peers change their weights
    alike, as after a partition in which each side averaged on its own. Both sides go on
    averaging, each with its own weights; the pair takes the three's state mid-run and the five
    train on together. Before, the sides stayed apart to the end, where the pair took the others'
    weights."""
    trainers, summaries, records = await train_with_the_last_apart(tmp_path, 5, 2)
    merges = [[r for r in peer if r["event"] == "lineage"] for peer in records]
    assert not any(r["adopted"] for merged in merges[:3] for r in merged), merges  # the larger side never moves
    assert [s["final_weights"] for s in summaries[:3]] == ["own"] * 3, summaries
    # the pair takes the three's state mid-run: at least one of them because the three outnumber
    # it (on a loaded machine its partner, averaging with it as it moved, may fail the next round
    # and catch up with the swarm's state instead), both before the end
    assert any(r["adopted"] for merged in merges[3:] for r in merged), merges
    assert all(any(r["event"] == "state" and r.get("source") == "swarm" for r in peer) for peer in records[3:])
    assert len({weights_digest(t.optimizer.global_weights) for t in trainers}) == 1


@pytest.mark.slow  # ~21 s; the rule itself: test_of_two_lineages_alike_in_number_the_one_without_the_smallest_peer_id_moves
async def test_of_two_pairs_apart_mid_run_the_one_without_the_smallest_peer_id_takes_the_others_state(tmp_path):
    """Fault injected at a chosen point: after round 1 two of four peers change their weights alike
    (a partition's halves). Two against two: the pair without the smallest peer id takes the other
    pair's state mid-run, the other never moves, and all four end alike. Before, a tie moved nobody
    and the pairs averaged apart to the end (a chaos run's healed partition)."""
    trainers, summaries, records = await train_with_the_last_apart(tmp_path, 4, 2)
    smallest = min(range(4), key=lambda i: trainers[i].me)
    staying, moving = ([0, 1], [2, 3]) if smallest < 2 else ([2, 3], [0, 1])
    merges = [[r for r in peer if r["event"] == "lineage"] for peer in records]
    assert not any(r["adopted"] for i in staying for r in merges[i]), merges
    assert any(r["adopted"] for i in moving for r in merges[i]), merges
    assert len({weights_digest(t.optimizer.global_weights) for t in trainers}) == 1, summaries


@pytest.mark.slow  # ~27 s, to keep the default suite under 15 minutes; the chaos soak has peers left behind too
async def test_a_peer_left_behind_takes_the_final_weights_once_the_others_finished(tmp_path):
    """Fault injected at a chosen point: one of three peers stalls after its round 1 until the other
    two have finished the run. It then takes their final weights at its next round end instead of
    stepping the remaining rounds alone (after a healed partition, three peers stepped their last
    10 rounds alone, 20 s each, while four had finished: the chaos watchdog fired)."""
    import time as clock

    config = RunConfig(model="tiny", inner_steps=5, batch_size=8, rounds=4, round_timeout=10)
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        trainers = [Trainer(peer, config, out=tmp_path / f"peer{i}", wait_peers=3) for i, peer in enumerate(peers)]
        straggler, others = trainers[2], trainers[:2]
        note = straggler._note_weights

        def stalling(optimizer):
            if optimizer.round == 1:
                deadline = clock.monotonic() + 120
                while not all(t.progress.final for t in others) and clock.monotonic() < deadline:
                    clock.sleep(0.2)
            note(optimizer)
        straggler._note_weights = stalling
        summaries = await train_all(trainers)
        nursery.cancel_scope.cancel()
    rounds = [r["round"] for r in metrics(tmp_path / "peer2") if r["event"] == "round"]
    assert summaries[2]["final_weights"] == "adopted" and summaries[2]["round"] == config.rounds, summaries[2]
    assert max(rounds, default=0) < config.rounds - 1, rounds  # it stepped no remaining round alone
    assert len({weights_digest(t.optimizer.global_weights) for t in trainers}) == 1, summaries


def apart_after_round(trainer: Trainer, round_: int) -> None:
    """Change ``trainer``'s swarm weights once round ``round_`` is applied (the same change on every
    trainer it is applied to: peers that held the same weights still do)."""
    record = trainer._on_applied

    def applied(applied_round, reduced):
        if applied_round == round_:
            trainer.optimizer.global_weights.add_(1e-3)
        record(applied_round, reduced)
    trainer._on_applied = applied


def out_of_sync_after_round(trainer: Trainer, round_: int) -> None:
    """Mark ``trainer`` out of sync once round ``round_`` is applied, its weights unchanged."""
    record = trainer._on_applied

    def applied(applied_round, reduced):
        record(applied_round, reduced)
        if applied_round == round_:
            trainer.optimizer.out_of_sync = True
    trainer._on_applied = applied


def hold_round(trainer: Trainer, round_: int, until: threading.Event) -> None:
    """Hold ``trainer``'s training thread as it applies round ``round_`` (before its round moves on
    and it offers that state) until ``until`` is set, for at most 30 s."""
    record = trainer._on_applied

    def applied(applied_round, reduced):
        if applied_round == round_:
            until.wait(30)
        record(applied_round, reduced)
    trainer._on_applied = applied


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def test_a_peer_that_joins_after_the_others_finished_takes_their_final_weights_without_training(tmp_path):
    """A peer started while the others settle on their final weights (in a chaos run, restarted as
    they finished) takes those weights at once instead of stepping the run's rounds alone."""
    config = RunConfig(model="tiny", inner_steps=5, batch_size=8, rounds=2, round_timeout=20)
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 4)
        trainers = [Trainer(peer, config, out=tmp_path / f"peer{i}", wait_peers=3) for i, peer in enumerate(peers[:3])]
        summaries = [None] * 4

        async def run(index, trainer):
            summaries[index] = await trainer.run()

        with trio.fail_after(150):
            async with trio.open_nursery() as training:
                for index, trainer in enumerate(trainers):
                    training.start_soon(run, index, trainer)
                while not all(t.progress is not None and t.progress.settled for t in trainers):
                    await trio.sleep(0.1)
                late = Trainer(peers[3], config, out=tmp_path / "late", wait_peers=1)
                training.start_soon(run, 3, late)
        nursery.cancel_scope.cancel()
    assert summaries[3]["final_weights"] == "adopted" and summaries[3]["steps"] == 0, summaries[3]
    assert summaries[3]["rounds_alone"] == 0 and summaries[3]["round"] == config.rounds, summaries[3]
    assert len({weights_digest(t.optimizer.global_weights) for t in [*trainers, late]}) == 1


@pytest.mark.slow  # ~50 s: five peers, and three of them wait out the first two's first deadline
async def test_peers_that_finished_first_take_the_weights_most_peers_end_with(tmp_path):
    """Two peers finish first with weights of their own (their last round apart from the others,
    as in a chaos run where they finished 40 s ahead) and settle between themselves at their first
    deadline; the other three finish while the two still stay. The two then take the weights the
    three hold: every peer ends alike."""
    import time as clock

    config = RunConfig(model="tiny", inner_steps=5, batch_size=8, rounds=1, round_timeout=10)
    allowance = config.round_timeout + 4 * 1  # the trainer's settling allowance at heartbeat 1 s
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 5)
        trainers = [Trainer(peer, config, out=tmp_path / f"peer{i}", wait_peers=5) for i, peer in enumerate(peers)]

        def later(train):
            def finishing_later(model, corpus, optimizer):
                summary = train(model, corpus, optimizer)
                clock.sleep(allowance + 4)  # past the first two's first deadline, within their second
                return summary
            return finishing_later

        for trainer in trainers[:2]:  # the same change on both: they hold the same weights
            trainer._train = last_round_apart(trainer._train)
        for trainer in trainers[2:]:
            trainer._train = later(trainer._train)
        summaries = await train_all(trainers)
        nursery.cancel_scope.cancel()
    # which side adopts depends on who saw whose digest first (a tie goes to the smaller digest);
    # before, the first two left with their own weights and the three kept theirs
    assert len({weights_digest(t.optimizer.global_weights) for t in trainers}) == 1, summaries
    assert sum(s["final_weights"] == "adopted" for s in summaries) >= 2, summaries
