"""Two-level rounds: more peers than a group holds average in several groups, whose owners reduce
each cell of the vector across the groups, so that every group gets the same mean."""

import numpy as np
import pytest
import torch
import trio

from averaging.allreduce import GroupSpec, RoundFailed, RoundStats, SpecError
from averaging.averager import Averager
from averaging.matchmaking import MatchmakingFailed
from averaging.partition import cell_bounds, cell_owner_bounds
from peer_helpers import start_peers


def test_parts_of_a_two_level_round_are_whole_cells_of_one_grid():
    grid = cell_bounds(10_000, 3)
    assert grid[0] == 0 and grid[-1] == 10_000 and len(grid) == 4
    assert cell_owner_bounds(10_000, 3, 2) == [0, grid[1], 10_000]  # the second member owns two cells
    members = tuple(f"m{i}" for i in range(2))
    spec = GroupSpec("g", members, ((), ()), tuple(cell_owner_bounds(10_000, 3, 2)), "none", cells=3)
    spec.validate()
    assert [c for c, _, _ in spec.cells_of(0)] == [0] and [c for c, _, _ in spec.cells_of(1)] == [1, 2]
    assert spec.to_wire()["cells"] == 3
    with pytest.raises(SpecError, match="whole cells"):  # a part ending inside a cell
        GroupSpec("g", members, ((), ()), (0, grid[1] + 256, 10_000), "none", cells=3).validate()
    with pytest.raises(SpecError, match="cell count"):
        GroupSpec("g", members, ((), ()), (0, 5_000, 10_000), "none", cells=10_000).validate()


def test_a_sharded_rounds_cells_are_its_orders_ranges_numbered_by_where_they_lie():
    """With an order (a sharded run's shards), each range is a cell, numbered from the start of
    the natural vector, so that groups ordering the shards differently reduce the same cells."""
    members = ("m0", "m1")
    order = ((2000, 4000), (0, 2000), (4000, 6000))  # shards 1, 0, 2
    spec = GroupSpec("g", members, ((), ()), (0, 4000, 6000), "none", order=order, cells=3)
    spec.validate()
    assert spec.cells_of(0) == [(1, 0, 2000), (0, 2000, 4000)] and spec.cells_of(1) == [(2, 4000, 6000)]
    with pytest.raises(SpecError, match="whole cells"):  # a part ending inside a shard
        GroupSpec("g", members, ((), ()), (0, 3000, 6000), "none", order=order, cells=3).validate()
    with pytest.raises(SpecError, match="not its cells"):
        GroupSpec("g", members, ((), ()), (0, 4000, 6000), "none", order=order, cells=4).validate()


async def test_groups_of_a_round_reduce_across_each_other_and_all_hold_one_mean():
    """Five peers, groups of at most three: two groups, whose owners reduce each of the three
    cells with the other group's owner of it. Every peer ends with the same values, the mean of
    all five weighted by their weights (a group weighs what its members do together). Without
    the second level each group keeps its own mean."""
    size, weights = 3000, [1.0, 2.0, 3.0, 4.0, 5.0]
    vectors = [np.random.default_rng(i).standard_normal(size).astype(np.float32) for i in range(5)]
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 5)
        averagers = [Averager(p, target_group_size=3, matchmaking_budget=5) for p in peers]
        for averager in averagers:
            averager.matchmaker.swarm_size = 5
        results = {}

        async def average(i):
            try:
                results[i] = await averagers[i].all_reduce([torch.from_numpy(vectors[i])], weight=weights[i],
                                                           group_key="r1", timeout=60, base="b", across_groups=True)
            except MatchmakingFailed as exc:  # a peer whose view left it alone: not part of the round
                results[i] = exc

        with trio.fail_after(120):
            async with trio.open_nursery() as rounds:
                for i in range(5):
                    rounds.start_soon(average, i)
        averaged = {i: r for i, r in results.items() if not isinstance(r, Exception)}
        groups = {r.stats.group_id for r in averaged.values()}
        assert len(groups) >= 2, "the five peers formed one group: the second level was not exercised"
        contributors = {m for r in averaged.values() for m in r.stats.contributors}
        index = {p.peer_id.to_base58(): i for i, p in enumerate(peers)}
        counted = sorted(index[m] for m in contributors)
        expected = sum(vectors[i] * weights[i] for i in counted) / sum(weights[i] for i in counted)
        outputs = [r.tensors[0].numpy() for r in averaged.values()]
        assert len(counted) == len(averaged) >= 4
        assert all(np.array_equal(outputs[0], out) for out in outputs[1:])  # bit-identical in every group
        np.testing.assert_allclose(outputs[0], expected, rtol=1e-5, atol=1e-5)
        nursery.cancel_scope.cancel()


async def test_a_cell_whose_reduction_across_groups_fails_fails_the_round_and_says_why():
    """The second level's failure is the round's, and its reason is the cause itself, not the
    "Exceptions from Trio nursery" wrapping it (chaos runs logged only that)."""
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        averagers = [Averager(p, target_group_size=2, matchmaking_budget=2) for p in peers]

        def failing_cross(*args):
            async def cross(cell, values, weight, contributors):
                raise ValueError(f"cell {cell} found no second level")
            return cross

        reasons = []

        async def average(averager):
            averager.matchmaker.swarm_size = 4  # more peers expected than a group holds: two levels
            averager._cross_groups = failing_cross
            with pytest.raises(RoundFailed) as failed:
                await averager.all_reduce([torch.ones(1000)], group_key="r", timeout=30, base="b",
                                          across_groups=True)
            reasons.append(str(failed.value))

        with trio.fail_after(60):
            async with trio.open_nursery() as rounds:
                for averager in averagers:
                    rounds.start_soon(average, averager)
        assert len(reasons) == 2
        assert any("ValueError: cell" in r and "found no second level" in r for r in reasons), reasons
        nursery.cancel_scope.cancel()


async def test_a_cell_that_formed_no_group_while_another_groups_owner_sought_it_fails_the_round():
    """Two groups' owners of a cell that read each other but formed no group (an invitation that
    came too late, in a chaos run) each stepped the cell with their own group's mean, and the
    swarm's weights parted for nine rounds. Such a cell fails the round (the groups' weights stay
    as they were), and so does one that another group's owner sought and left before it came; a
    cell that nobody else sought keeps its group's mean, as before."""
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        # the first leads (the smaller id): it invites the other, which rejects it (a leader that
        # never invites counts as gone, as does an invitee that never answers); the other seeks on
        # past the first's deadline
        first, other = sorted(peers, key=lambda p: p.peer_id.to_base58())
        first, other = Averager(first, target_group_size=2, matchmaking_budget=2), \
            Averager(other, target_group_size=2, matchmaking_budget=10)
        for averager in (first, other):
            averager.matchmaker.swarm_size = 4  # two groups of two expected
        values = np.ones(1000, dtype=np.float32)

        def cross(averager, key, timeout=8):
            now = trio.current_time()
            return averager._cross_groups(key, "none", "b", 2, timeout, now + timeout,
                                          RoundStats("cells", []))(0, values, 1.0, 2)

        with trio.fail_after(40):
            assert np.array_equal(await cross(first, "alone", 4), values)  # nobody else: its own mean
            # the other group's owner of that cell comes once the first has left (two groups whose
            # rounds did not overlap, in a chaos run): its mean alone would part the weights
            with pytest.raises(MatchmakingFailed, match="cell 0 formed no group after other groups' owners of it"):
                await cross(other, "alone", 2)
            # the other owner will not group with this one (it left it out), but seeks under the cell
            other.cells_matchmaker.exclude([first.matchmaker.me])
            outcomes = {}

            async def seek(name, averager, timeout):
                try:
                    outcomes[name] = await cross(averager, "met", timeout)
                except MatchmakingFailed as exc:
                    outcomes[name] = exc

            async with trio.open_nursery() as both:
                both.start_soon(seek, "first", first, 8)
                both.start_soon(seek, "other", other, 10)
        assert isinstance(outcomes["first"], MatchmakingFailed), outcomes
        assert "cell 0 formed no group with the other groups' owners seeking it" in str(outcomes["first"])
        assert np.array_equal(outcomes["other"], values)  # it never read the first: as if alone
        nursery.cancel_scope.cancel()


async def test_a_cells_owners_wait_for_every_peer_expected_though_the_swarm_outnumbers_a_cell_group(monkeypatch):
    """A cell's owners form their group once the owners they read stand for every peer expected,
    though the swarm holds more peers than a group may hold owners (``MAX_MEMBERS``, 4 here):
    until 2026-12-07 the peers expected were capped at that bound, so beyond 256 peers a cell
    formed as soon as 16 groups' owners were read, and the round's later groups reduced it apart.
    Three groups of two (6 peers): two owners come at once, the third 1.5 s later; all three
    reduce the cell together."""
    monkeypatch.setattr("averaging.averager.MAX_MEMBERS", 4)
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        averagers = [Averager(p, target_group_size=2, matchmaking_budget=5) for p in peers]
        for averager in averagers:
            averager.matchmaker.swarm_size = 6
        outputs = {}

        async def cross(i, delay):
            await trio.sleep(delay)
            now = trio.current_time()
            reduce_cell = averagers[i]._cross_groups("r", "none", "b", 2, 20, now + 20, RoundStats("cells", []))
            outputs[i] = await reduce_cell(0, np.full(1000, float(i), np.float32), 1.0, 2)

        with trio.fail_after(40):
            async with trio.open_nursery() as owners:
                for i, delay in enumerate((0, 0, 1.5)):
                    owners.start_soon(cross, i, delay)
        assert len(outputs) == 3
        assert all(np.array_equal(outputs[0], out) for out in outputs.values())
        np.testing.assert_allclose(outputs[0], 1.0)  # the mean of 0, 1 and 2
        nursery.cancel_scope.cancel()
