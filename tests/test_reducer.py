"""The swarm reducer's choice between a round with others and a round alone."""

import torch
import trio

from swarm.reducer import LOST_PEERS_TIMEOUTS, SwarmReducer

TIMEOUT = 10.0


def reducer_seeing(peers: dict) -> SwarmReducer:
    """A reducer whose board shows ``peers["n"]`` peers training (itself included). Its averager is
    never reached here: every round below is one alone, or the choice before the averaging."""
    return SwarmReducer(None, "run", lambda: peers["n"], timeout=TIMEOUT)


async def alone_round(reducer: SwarmReducer, key: str) -> float:
    """Seconds round ``key`` took before it was stepped alone."""
    started = trio.current_time()
    values = torch.arange(4.0)
    reduced = await reducer([values], 1.0, "none", key)
    assert reduced.group_size == 1 and torch.equal(reduced.tensors[0], values)
    return trio.current_time() - started


async def test_a_peer_that_loses_sight_of_the_others_waits_for_them_before_stepping_alone(autojump_clock):
    """A peer that trained with others and sees none (a partition cutting its DHT reads) waits a
    round timeout for them, round after round for LOST_PEERS_TIMEOUTS timeouts, then steps alone
    at once: in a chaos run it stepped 11 rounds alone in 40 s and ended apart from everyone."""
    peers = {"n": 3}
    reducer = reducer_seeing(peers)
    assert await reducer._expected_after_losing_others("diloco-0") == 3
    peers["n"] = 1
    waits = [await alone_round(reducer, f"diloco-{r}") for r in range(1, LOST_PEERS_TIMEOUTS + 2)]
    assert waits == [TIMEOUT] * LOST_PEERS_TIMEOUTS + [0.0]


async def test_a_peer_that_sees_the_others_again_while_it_waits_averages_with_them(autojump_clock):
    peers = {"n": 3}
    reducer = reducer_seeing(peers)
    await reducer._expected_after_losing_others("diloco-0")
    peers["n"] = 1

    async def partition_heals():
        await trio.sleep(4)
        peers["n"] = 3

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partition_heals)
        started = trio.current_time()
        assert await reducer._expected_after_losing_others("diloco-1") == 3
        assert 4 <= trio.current_time() - started < 5


async def test_a_peer_alone_from_the_start_or_after_the_others_finished_does_not_wait(autojump_clock):
    assert await alone_round(reducer_seeing({"n": 1}), "diloco-0") == 0.0
    peers = {"n": 3}
    reducer = reducer_seeing(peers)
    await reducer._expected_after_losing_others("diloco-0")
    peers["n"], reducer.others_finished = 1, lambda: True
    assert await alone_round(reducer, "diloco-1") == 0.0
