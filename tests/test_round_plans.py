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
