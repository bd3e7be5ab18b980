"""The training algorithms in one process, with reducers that stand in for a group of peers."""

import pytest
import torch
import trio

from optim.base import Reduced, StateError, weights_digest
from optim.diloco import DiLoCo
from optim.model import GPT
from optim.model_config import GPTConfig
from optim.onebit_adam import OneBitAdam
from optim.schedule import lr_factor

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)


async def alone(tensors, weight, codec, key):
    return Reduced([t.clone() for t in tensors], 1)


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (4, 9), generator=g) for _ in range(n)]


def train(optimizer, model, data):
    for tokens in data:
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        optimizer.step(len(tokens))
        optimizer.zero_grad()
    optimizer.finish()


def model_and_inner():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


async def test_diloco_overlapped_alone_equals_diloco_waiting_alone():
    """Alone, the eager estimate is exactly the next swarm weights, so overlap changes nothing."""
    data = batches(20)
    results = []
    async with trio.open_nursery() as nursery:
        for overlap in (False, True):
            model, inner = model_and_inner()
            opt = DiLoCo(model.parameters(), inner, alone, inner_steps=5, overlap=overlap, nursery=nursery)
            await trio.to_thread.run_sync(train, opt, model, data)
            assert opt.round == 4
            results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)
    model, _ = model_and_inner()
    assert not torch.allclose(results[0], torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


async def test_diloco_applies_the_group_mean_and_flags_a_failed_round():
    calls = []

    async def half_of_it(tensors, weight, codec, key):
        calls.append((key, codec, weight))
        if key == "diloco-1":
            return None  # others train, but no group averaged this round
        return Reduced([t * 0.5 for t in tensors], 2)

    model, inner = model_and_inner()
    async with trio.open_nursery() as nursery:
        opt = DiLoCo(model.parameters(), inner, half_of_it, inner_steps=3, overlap=False, nursery=nursery,
                     codec="int8")
        start = opt.global_weights.clone()
        await trio.to_thread.run_sync(train, opt, model, batches(3))
        # one outer Nesterov step on the group's mean (half this peer's pseudo-gradient)
        delta = start - opt.global_weights
        assert opt.round == 1 and not opt.out_of_sync
        stepped = opt.global_weights.clone()
        await trio.to_thread.run_sync(train, opt, model, batches(3))
        assert opt.out_of_sync and opt.stats.rounds_failed == 1
        # a failed round leaves the swarm weights as they were, alike on every survivor
        assert opt.round == 2 and torch.equal(opt.global_weights, stepped)
    assert [c[0] for c in calls] == ["diloco-0", "diloco-1"] and calls[0][1:] == ("int8", 12)
    assert delta.abs().sum() > 0


async def test_onebit_adam_during_warmup_is_adam():
    data = batches(6)
    model, _ = model_and_inner()
    opt = OneBitAdam(model.parameters(), alone, lr=1e-2, betas=(0.9, 0.99), warmup_steps=10)
    await trio.to_thread.run_sync(train, opt, model, data)
    reference, _ = model_and_inner()
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for tokens in data:
        reference(tokens[:, :-1], tokens[:, 1:])[1].backward()
        adam.step()
        adam.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-4)  # Adam amplifies float noise on zero-gradient key biases


async def test_onebit_adam_after_warmup_sends_the_momentum_with_the_sign_codec():
    seen = []

    async def record(tensors, weight, codec, key):
        seen.append(codec)
        return Reduced([t.clone() for t in tensors], 2)

    model, _ = model_and_inner()
    opt = OneBitAdam(model.parameters(), record, warmup_steps=2)
    await trio.to_thread.run_sync(train, opt, model, batches(4))
    assert seen == ["none", "none", "sign1", "sign1"]


def test_diloco_overlap_needs_a_nursery():
    model, inner = model_and_inner()
    with pytest.raises(ValueError, match="nursery"):
        DiLoCo(model.parameters(), inner, alone, overlap=True)


async def test_a_state_that_does_not_fit_is_refused_and_changes_nothing():
    model, inner = model_and_inner()
    async with trio.open_nursery() as nursery:
        opt = DiLoCo(model.parameters(), inner, alone, inner_steps=2, nursery=nursery)
        await trio.to_thread.run_sync(train, opt, model, batches(4))
        good = opt.state_tensors()
        before = {k: v.clone() for k, v in good.items()}
        wrong_inner = next(k for k in good if k.startswith("inner.") and good[k].dim() > 0)
        bad_states = [
            {**good, "weights": good["weights"][:-1]},
            {**good, "outer_momentum": torch.full_like(good["outer_momentum"], float("nan"))},
            {**good, wrong_inner: torch.zeros(3)},
            {**good, "inner.999.exp_avg": torch.zeros(3)},
            {k: v for k, v in good.items() if k != "outer_momentum"},
        ]
        for bad in bad_states:
            with pytest.raises(StateError):
                opt.load_state(9, bad)
            assert opt.round == 2
            assert all(torch.equal(v, opt.state_tensors()[k]) for k, v in before.items())
        opt.load_state(9, good)
        assert opt.round == 9


async def test_a_round_in_flight_for_weights_replaced_by_an_adopted_state_is_averaged_again_and_its_mean_unused():
    """A peer that adopts the swarm's state of its own round while its group (holding the old
    weights) still averages that round lets the group finish, never applies that mean, and
    averages the round again from the adopted weights (chaos soak: one round, two groups)."""
    keys, release = [], trio.Event()

    async def reducer(tensors, weight, codec, key, base=""):
        keys.append((key, base))
        if len(keys) == 1:
            await release.wait()
            return Reduced([t * 1e3 for t in tensors], 2)  # the stale group's mean: must go unused
        return Reduced([t.clone() for t in tensors], 2)

    model, inner = model_and_inner()
    async with trio.open_nursery() as nursery:
        opt = DiLoCo(model.parameters(), inner, reducer, inner_steps=2, nursery=nursery)
        opt.agree_on_weights = True
        await trio.to_thread.run_sync(lambda: [opt.step(1) for _ in range(2)])
        assert opt.round == 0 and opt._pending is not None  # diloco-0 averaging in the background
        swarm_state = {**opt.state_tensors(), "weights": opt.global_weights + 0.01}
        await trio.to_thread.run_sync(opt.load_state, 0, swarm_state)
        release.set()
        await trio.sleep(0.1)
        await trio.to_thread.run_sync(train, opt, model, batches(2))
    assert [key for key, _ in keys] == ["diloco-0", "diloco-0"] and keys[0][1] != keys[1][1]
    assert opt.round == 1 and opt.stats.rounds_averaged == 1
    assert (opt.global_weights - swarm_state["weights"]).abs().max() < 1.0


@pytest.mark.parametrize("fetched", ["the swarm's state", "nothing"])
async def test_a_peer_that_adopted_an_older_state_joins_the_swarms_round_at_once_and_fetches_its_state_meanwhile(
        fetched):
    """After adopting round 0's state, a peer whose swarm already seeks round 1's group joins it at
    once, under the base the swarm declares, while the swarm's state of round 1 is still on its
    way (fetched first, over a relay, it came after the group formed: bench/internet.py), and
    applies the round's mean to that state. Without the state the mean goes unused and the peer
    is out of sync."""
    keys, release, joined = [], trio.Event(), trio.Event()

    async def reducer(tensors, weight, codec, key, base=""):
        keys.append((key, base))
        joined.set()
        return Reduced([torch.zeros_like(t) for t in tensors], 2)

    model, inner = model_and_inner()
    async with trio.open_nursery() as nursery:
        opt = DiLoCo(model.parameters(), inner, reducer, inner_steps=2, nursery=nursery)
        opt.agree_on_weights = True
        state = opt.state_tensors()
        await trio.to_thread.run_sync(opt.load_state, 0, {**state, "weights": opt.global_weights + 0.01})
        swarm_state = {**state, "weights": opt.global_weights + 0.02, "outer_momentum": torch.zeros(len(state["weights"]))}
        asked = []

        async def fetch_state(round_):
            asked.append(round_)
            await release.wait()
            return (1, swarm_state) if fetched == "the swarm's state" else None

        opt.fetch_state, opt.swarm_round = fetch_state, lambda: 1
        opt.swarm_base = lambda round_: weights_digest(swarm_state["weights"]) if round_ == 1 else ""
        await trio.to_thread.run_sync(opt.step, 1)  # the swarm seeks round 1: this round ends now
        with trio.fail_after(5):
            await joined.wait()  # averaging under the swarm's base before its state arrived
        assert keys == [("diloco-1", weights_digest(swarm_state["weights"]))] and asked == [1]
        assert opt.round == 1 and opt.snapshot[0] == 0  # the snapshot stays what this peer holds
        release.set()
        await trio.to_thread.run_sync(lambda: [opt.step(1) for _ in range(2)])
        if fetched == "nothing":
            assert opt.out_of_sync and opt.stats.rounds_failed == 1 and opt.stats.rounds_averaged == 0
        else:
            # the mean (zero) applied to the swarm's state: this peer now holds the swarm's weights
            assert not opt.out_of_sync and opt.stats.rounds_averaged == 1 and opt.round == 2
            assert torch.equal(opt.global_weights, swarm_state["weights"]) and opt.snapshot[0] == 2
            assert keys[1] == ("diloco-2", weights_digest(swarm_state["weights"]))
        nursery.cancel_scope.cancel()


def test_the_cosine_schedule_decays_to_a_tenth_and_the_constant_one_stays():
    factors = [lr_factor("cosine", i / 10) for i in range(11)]
    assert factors[0] == 1.0 and abs(factors[-1] - 0.1) < 1e-12 and abs(factors[5] - 0.55) < 1e-12
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert lr_factor("cosine", 1.5) == factors[-1]  # past the end: the floor
    assert lr_factor("constant", 0.7) == 1.0
    with pytest.raises(ValueError):
        lr_factor("linear", 0.5)


async def test_diloco_counts_its_progress_in_rounds_and_takes_a_new_learning_rate():
    model, inner = model_and_inner()
    async with trio.open_nursery() as nursery:
        opt = DiLoCo(model.parameters(), inner, alone, inner_steps=4, overlap=True, nursery=nursery)
        progress = []

        def run():
            for tokens in batches(6):
                progress.append(opt.round_progress)
                model(tokens[:, :-1], tokens[:, 1:])[1].backward()
                opt.step(len(tokens))
                opt.zero_grad()
            opt.set_lr(1e-4)

        await trio.to_thread.run_sync(run)
        assert progress == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]  # round 0 is averaging in the background
        assert all(group["lr"] == 1e-4 for group in inner.param_groups)
        await trio.to_thread.run_sync(opt.finish)


async def test_a_peer_that_takes_the_state_of_the_runs_last_round_averages_no_round_past_it():
    """A peer joining late takes the swarm's state of the run's last round (the others finished):
    it has nothing left to average. Before, it began a round past the run's end (round 21 of 20 in
    a chaos run) and averaged it alone."""
    keys = []

    async def reducer(tensors, weight, codec, key, base=""):
        keys.append(key)
        return Reduced([t.clone() for t in tensors], 2)

    model, inner = model_and_inner()
    async with trio.open_nursery() as nursery:
        opt = DiLoCo(model.parameters(), inner, reducer, inner_steps=2, nursery=nursery)
        opt.agree_on_weights, opt.last_round = True, 2
        state = opt.state_tensors()
        await trio.to_thread.run_sync(opt.load_state, 1, {**state, "weights": opt.global_weights + 0.01})
        final = {**state, "weights": opt.global_weights + 0.02, "outer_momentum": torch.zeros(len(state["weights"]))}

        async def fetch_state(round_):
            return 2, final

        opt.fetch_state, opt.swarm_round, opt.swarm_base = fetch_state, lambda: None, lambda round_: ""
        await trio.to_thread.run_sync(lambda: [opt.step(1) for _ in range(2)])  # round 1 ends: the state of 2
        assert opt.round == 2 and opt.rounds_begun == 2 and keys == []
        await trio.to_thread.run_sync(opt.finish)
        assert opt.round == 2 and keys == [] and torch.equal(opt.global_weights, final["weights"])
        nursery.cancel_scope.cancel()
