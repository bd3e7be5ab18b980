"""Owner-side steps through the all-reduce (``RoundPlan``): the leader orders the vector and every
member sends back its transform of its part's mean. In-process peers on 127.0.0.1, real hosts."""

import numpy as np
import pytest
import torch
import trio

from averaging.allreduce import GroupSpec, SpecError
from averaging.averager import Averager

SIZE, PIECES = 6000, 6
PIECE = SIZE // PIECES


class ReversedPieces:
    """Six pieces in reverse order, two per member; member k adds 0.1 k to the mean of its part."""

    def __init__(self):
        self.prepared = []

    def order(self, members):
        order = [(p * PIECE, (p + 1) * PIECE) for p in reversed(range(PIECES))]
        per_member = SIZE // len(members)
        return order, [k * per_member for k in range(len(members))] + [SIZE]

    async def prepare(self, spec, me):
        self.prepared.append(spec.part(me))
        return lambda a, b, mean: mean + np.float32(0.1 * me)


def expected_output(mean: np.ndarray, members: int) -> np.ndarray:
    """Where each value lands in the reversed order, and so which member transformed it."""
    position = np.concatenate([np.arange(p * PIECE, (p + 1) * PIECE) for p in reversed(range(PIECES))])
    reducer = np.searchsorted(np.arange(1, members) * (SIZE // members), np.arange(SIZE), side="right")
    out = np.empty(SIZE, np.float32)
    out[position] = mean[position] + 0.1 * reducer.astype(np.float32)
    return out


@pytest.mark.parametrize("codec", ["none", "int8"])
async def test_each_part_comes_back_as_its_reducers_transform_in_the_natural_order(codec):
    from peer_helpers import start_peers

    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        averagers = [Averager(p, target_group_size=3, matchmaking_budget=10) for p in peers]
        plans = [ReversedPieces() for _ in peers]
        contributions = [torch.arange(SIZE, dtype=torch.float32) * 1e-3 + i for i in range(3)]
        results = {}

        async def average(i):
            results[i] = await averagers[i].all_reduce([contributions[i]], codec=codec, group_key="plan",
                                                       timeout=60, plan=plans[i])

        async with trio.open_nursery() as group:
            for i in range(3):
                group.start_soon(average, i)
        outputs = [results[i].tensors[0].numpy() for i in range(3)]
        for output in outputs[1:]:
            np.testing.assert_array_equal(output, outputs[0])  # every member holds the same bytes
        expected = expected_output(torch.stack(contributions).mean(0).numpy(), 3)
        np.testing.assert_allclose(outputs[0], expected, rtol=0, atol=1e-5 if codec == "none" else 0.05)
        assert sorted(sum((p.prepared for p in plans), [])) == [(0, 2000), (2000, 4000), (4000, 6000)]
        alone = await averagers[0].transform_alone([contributions[0]], ReversedPieces())
        np.testing.assert_allclose(alone[0].numpy(), contributions[0].numpy(), rtol=0, atol=1e-6)  # member 0 adds 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("order", [
    [[0, 10], [5, 20]],  # overlapping
    [[10, 20]],  # does not start at 0, does not cover
    [[0, 10], [10, 10], [10, 20]],  # an empty range
    [[10, 20], [0, 9]],  # a gap
])
def test_a_spec_whose_order_is_not_a_split_of_the_vector_is_rejected(order):
    wire = {"group": "g", "members": ["a", "b"], "addrs": [[], []], "bounds": [0, 10, 20], "codec": "none",
            "order": order}
    with pytest.raises(SpecError):
        GroupSpec.from_wire(wire)
    wire["order"] = [[10, 20], [0, 10]]
    assert GroupSpec.from_wire(wire).permutation().tolist() == list(range(10, 20)) + list(range(10))


async def test_a_leader_whose_order_cuts_a_shard_fails_the_round_and_crashes_no_one():
    """Sharded members check the leader's order: a part that is not whole shards of theirs is a
    failed round (``RoundFailed``, what the swarm reducer handles), not an exception that would
    end the trainer."""
    from averaging.allreduce import RoundFailed
    from shards.layout import ShardLayout
    from shards.outer import ShardedOuter

    layout = ShardLayout(total=SIZE, count=4)

    class CutsShards:
        def order(self, members):
            return [(0, SIZE)], [0, SIZE // 3, SIZE]  # one range across every shard

        async def prepare(self, spec, me):
            return lambda a, b, mean: mean

    async with trio.open_nursery() as nursery:
        peers = await start_peers_sorted(nursery, 2)
        leader, member = peers
        outer = ShardedOuter(member.host, layout, lr=1.0, momentum=0.9, run_id="r",
                             assignment=lambda: None, peers=lambda: [], digest=lambda w: "w", timeout=3)
        averagers = [Averager(p, target_group_size=2, matchmaking_budget=10) for p in peers]
        failures = {}

        async def average(i, plan):
            with pytest.raises(RoundFailed) as failed:
                await averagers[i].all_reduce([torch.ones(SIZE)], group_key="cut", timeout=20, plan=plan)
            failures[i] = str(failed.value)

        async with trio.open_nursery() as group:
            group.start_soon(average, 0, CutsShards())
            group.start_soon(average, 1, outer.plan(0, "w"))
        assert "cannot reduce this member's part" in failures[1] and "not a whole shard" in failures[1]
        nursery.cancel_scope.cancel()


async def start_peers_sorted(nursery, count):
    """Peers ordered by id: the first leads every group they form."""
    from peer_helpers import start_peers

    return sorted(await start_peers(nursery, count), key=lambda p: p.peer_id.to_base58())
