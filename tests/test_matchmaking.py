"""Matchmaking seen from a latecomer: in-process peers on 127.0.0.1 with real hosts and DHT."""

import pytest
import torch
import trio

from averaging.averager import Averager
from averaging.matchmaking import MatchmakingFailed
from peer_helpers import start_peers


async def test_a_latecomer_sees_whether_a_group_still_waits_and_fails_fast_once_it_formed():
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        first, second, late = (Averager(p, target_group_size=2, matchmaking_budget=10) for p in peers)
        assert not await late.matchmaker.waiting_for_more("k")  # nobody seeks yet
        results = {}

        async def average(name, averager, value):
            results[name] = await averager.all_reduce([torch.full((1000,), value)], group_key="k", timeout=30)

        async with trio.open_nursery() as group:
            group.start_soon(average, "first", first, 1.0)
            with trio.fail_after(10):
                while not await late.matchmaker.waiting_for_more("k"):  # one of two declared
                    await trio.sleep(0.2)
            group.start_soon(average, "second", second, 3.0)
        assert all(torch.allclose(r.tensors[0], torch.full((1000,), 2.0)) for r in results.values())
        assert not await late.matchmaker.waiting_for_more("k")  # formed and left
        # The group formed without the latecomer: it fails at once instead of waiting out its 30 s
        # (a test of outcome, not speed: a peer still waiting would fail with another message)
        with pytest.raises(MatchmakingFailed, match="formed without this peer"):
            await late.all_reduce([torch.ones(1000)], group_key="k", timeout=30)
        nursery.cancel_scope.cancel()
