"""Matchmaking seen from a latecomer: in-process peers on 127.0.0.1 with real hosts and DHT."""

import contextlib
import logging

import pytest
import torch
import trio

from averaging.averager import Averager
from averaging.groups import ROTATION_ROUNDS, rotation_of
from averaging.matchmaking import MatchmakingFailed
from peer_helpers import start_peers


async def test_a_latecomer_sees_whether_a_group_still_waits_and_fails_fast_once_it_formed():
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        first, second, late = (Averager(p, target_group_size=2, matchmaking_budget=10) for p in peers)
        assert await late.matchmaker.open_base("k") is None  # nobody seeks yet
        results = {}

        async def average(name, averager, value):
            results[name] = await averager.all_reduce([torch.full((1000,), value)], group_key="k", timeout=30,
                                                      base="weights-digest")

        async with trio.open_nursery() as group:
            group.start_soon(average, "first", first, 1.0)
            with trio.fail_after(10):
                while (base := await late.matchmaker.open_base("k")) is None:  # one of two declared
                    await trio.sleep(0.2)
            assert base == "weights-digest"  # what a latecomer joins under
            group.start_soon(average, "second", second, 3.0)
        assert all(torch.allclose(r.tensors[0], torch.full((1000,), 2.0)) for r in results.values())
        assert await late.matchmaker.open_base("k") is None  # formed and left
        # The group formed without the latecomer: it fails at once instead of waiting out its 30 s
        # (a test of outcome, not speed: a peer still waiting would fail with another message)
        with pytest.raises(MatchmakingFailed, match="formed without this peer"):
            await late.all_reduce([torch.ones(1000)], group_key="k", timeout=30)
        nursery.cancel_scope.cancel()


async def test_a_straggler_seeking_alone_is_not_taken_for_a_group_forming():
    """A peer seeking alone under a round whose target is four is a straggler of a group that
    formed without it: a latecomer joining it would part from the swarm (bench/internet.py).
    Two of four are a group forming."""
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        first, second, late = (Averager(p, target_group_size=4, matchmaking_budget=30) for p in peers)
        seeking = []

        async def seek(averager):
            seeking.append(averager)
            with contextlib.suppress(MatchmakingFailed):
                await averager.all_reduce([torch.ones(1000)], group_key="k", timeout=60, base="b")

        async with trio.open_nursery() as group:
            group.start_soon(seek, first)
            with trio.fail_after(10):
                while len(await late.matchmaker.dht.get(late.matchmaker._key("k")[0], every_replica=True)) < 1:
                    await trio.sleep(0.2)
            assert await late.matchmaker.open_base("k") is None  # one of four: a straggler
            group.start_soon(seek, second)
            with trio.fail_after(10):
                while (base := await late.matchmaker.open_base("k")) is None:  # two of four
                    await trio.sleep(0.2)
            assert base == "b"
            group.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_a_later_rounds_seeking_supersedes_one_still_seeking_and_forms_its_group():
    """A peer whose earlier round still sought a group (its average no longer wanted: it adopted a
    newer state) seeks the next round's: the earlier seeking ends at once, and the later one is
    invited and averages. Before, the earlier one kept seeking beside it and, leaving at its
    deadline, cleared the later one's slot, so the peer refused its own group's invitation."""
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        mine, other = (Averager(p, target_group_size=2, matchmaking_budget=5) for p in peers)
        outcomes = {}

        async def average(name, averager, key):
            try:
                outcomes[name] = await averager.all_reduce([torch.ones(1000)], group_key=key, timeout=60)
            except MatchmakingFailed as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as group:
            group.start_soon(average, "earlier", mine, "round-1")
            with trio.fail_after(10):
                while not mine.matchmaker._seekings:
                    await trio.sleep(0.1)
            group.start_soon(average, "later", mine, "round-2")
            group.start_soon(average, "other", other, "round-2")
        assert isinstance(outcomes["earlier"], MatchmakingFailed) and "later round" in str(outcomes["earlier"])
        assert not isinstance(outcomes["later"], Exception) and outcomes["later"].stats.outcome == "ok"
        nursery.cancel_scope.cancel()


async def test_a_peer_that_cannot_read_its_own_declaration_declares_again_and_never_groups_without_itself():
    """A chaos run crashed a peer (StopIteration) when its read of the matchmaking key lacked its
    own entry (a store that failed on a loaded machine), held enough others to split, and split
    them without itself."""
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        # the first splits as soon as it reads two peers; the others wait for all three
        first = Averager(peers[0], target_group_size=2, matchmaking_budget=5)
        second, third = (Averager(p, target_group_size=3, matchmaking_budget=5) for p in peers[1:])
        candidates = first.matchmaker._candidates
        reads = []

        async def without_own_entry_at_first(seeking):
            found, left = await candidates(seeking)
            if len(reads) < 3:
                found.pop(first.matchmaker.me, None)
            reads.append(set(found))
            return found, left

        first.matchmaker._candidates = without_own_entry_at_first
        outcomes = {}

        async def average(name, averager, value):
            try:
                outcomes[name] = await averager.all_reduce([torch.full((100,), value)], group_key="k", timeout=20)
            except MatchmakingFailed as exc:
                outcomes[name] = exc

        with trio.fail_after(60):
            async with trio.open_nursery() as group:
                group.start_soon(average, "second", second, 3.0)
                group.start_soon(average, "third", third, 5.0)
                with trio.fail_after(10):  # both others declared: the first's reads hold two peers
                    while len(await second.matchmaker.dht.get(second.matchmaker._key("k")[0])) < 2:
                        await trio.sleep(0.05)
                group.start_soon(average, "first", first, 1.0)
        assert reads and len(reads[0]) == 2 and first.matchmaker.me not in reads[0]
        averaged = [o for o in outcomes.values() if not isinstance(o, Exception)]
        assert len(outcomes) == 3 and len(averaged) >= 2, outcomes
        nursery.cancel_scope.cancel()


async def test_a_large_swarm_seeks_in_buckets_each_under_its_own_key_and_each_bucket_averages():
    """From twice the bucket size on, peers seek groups in buckets (``groups.bucket_of``): 8 peers
    with groups and buckets of 2 use 4 keys, and each peer averages with the peers of its own
    bucket only."""
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 8)
        averagers = [Averager(p, target_group_size=2, matchmaking_budget=5) for p in peers]
        for averager in averagers:
            averager.matchmaker.swarm_size, averager.matchmaker.bucket_peers = 8, 2
        # a round whose buckets all hold two or more peers (a bucket of one has nobody to average with)
        for round_ in range(5000):  # two in each bucket: 1 round in 26
            keys = [a.matchmaker._key(f"r{round_}")[0] for a in averagers]
            if len(set(keys)) == 4 and all(keys.count(k) == 2 for k in keys):
                break
        assert len(set(keys)) == 4 and all(k.endswith(("/4.0", "/4.1", "/4.2", "/4.3")) for k in keys)
        results = {}

        async def average(index: int) -> None:
            results[index] = await averagers[index].all_reduce([torch.full((100,), float(index))],
                                                               group_key=f"r{round_}", timeout=30)

        with trio.fail_after(60):
            async with trio.open_nursery() as group:
                for index in range(8):
                    group.start_soon(average, index)
        for index, result in results.items():
            bucket = [i for i in range(8) if keys[i] == keys[index]]
            assert sorted(result.stats.contributors) == sorted(str(peers[i].peer_id) for i in bucket)
            assert torch.allclose(result.tensors[0], torch.full((100,), sum(bucket) / len(bucket)))
        nursery.cancel_scope.cancel()


async def test_rounds_of_one_rotation_share_their_bucket_and_its_dht_nodes_and_look_them_up_once():
    """With a rotation (``groups.rotation_of``) a peer's bucket repeats every ``ROTATION_ROUNDS``
    rounds, and each round's key is held at its rotation's DHT nodes: three peers averaging 8
    rounds looked up the nodes of 4 keys, one per round of the cycle, not of 8 (a lookup a round
    was a third of matchmaking's DHT traffic at 1,000 peers, ``bench/dht_load.py``)."""
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        averagers = [Averager(p, target_group_size=3, matchmaking_budget=2) for p in peers]
        # in a large swarm, the bucket of round r and of round r + ROTATION_ROUNDS are one
        matchmaker = averagers[0].matchmaker
        matchmaker.swarm_size, matchmaker.target_size = 1000, 16
        keys = [matchmaker._key(f"run/diloco-{r}", rotation_of("run/diloco", r)) for r in range(2 * ROTATION_ROUNDS)]
        assert all(key.endswith(f"/diloco-{r}/{key.rpartition('/')[2]}") for r, (key, _) in enumerate(keys))
        assert [place for _, place in keys[:ROTATION_ROUNDS]] == [place for _, place in keys[ROTATION_ROUNDS:]]
        assert [key.rpartition("/")[2] for key, _ in keys[:ROTATION_ROUNDS]] == \
            [key.rpartition("/")[2] for key, _ in keys[ROTATION_ROUNDS:]]
        assert len({place for _, place in keys}) == ROTATION_ROUNDS
        matchmaker.swarm_size, matchmaker.target_size = 0, 3
        for round_ in range(2 * ROTATION_ROUNDS):
            results = {}

            async def average(index: int) -> None:
                results[index] = await averagers[index].all_reduce(
                    [torch.full((100,), float(index))], group_key=f"run/diloco-{round_}", timeout=30,
                    rotation=rotation_of("run/diloco", round_))

            with trio.fail_after(60):
                async with trio.open_nursery() as group:
                    for index in range(3):
                        group.start_soon(average, index)
            assert all(len(r.stats.contributors) == 3 for r in results.values())
        for peer in peers:
            looked_up = {k.decode() for k in peer.dht._lookups if b"/mm/" in k}
            assert looked_up == {f"/legion/{peer.config.swarm}/mm/{rotation_of('run/diloco', r)}"
                                 for r in range(ROTATION_ROUNDS)}, looked_up
        nursery.cancel_scope.cancel()


async def test_peers_of_different_weights_do_not_group_and_say_why():
    """A mean of updates to different weights would leave the members with different weights: two
    peers declaring different bases stay apart, and each one's failure names the other weights
    (where several groups of a round left the swarm split, this is what peers see)."""
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        averagers = [Averager(p, target_group_size=2, matchmaking_budget=2) for p in peers]
        failures = []

        async def seek(averager, base):
            with pytest.raises(MatchmakingFailed) as failed:
                await averager.all_reduce([torch.ones(1000)], group_key="k", timeout=8, base=base)
            failures.append(str(failed.value))

        async with trio.open_nursery() as group:
            group.start_soon(seek, averagers[0], "weights-a")
            group.start_soon(seek, averagers[1], "weights-b")
        assert len(failures) == 2
        assert all("1 peer there held other weights" in f for f in failures), failures
        nursery.cancel_scope.cancel()


async def test_a_peer_whose_reads_missed_a_seeker_groups_once_the_others_left_before_its_partner_gives_up(caplog):
    """4 peers in groups of 2: three read all four and split; the fourth, leading its group (the
    smallest id), read only three of them, then its partner and two peers that had formed their
    group and left. Those count as read: it leads its group at once. Before, it waited out its
    budget for a fourth seeker, its partner gave up on its invitation, and both missed the round."""
    caplog.set_level(logging.INFO, logger="averaging.matchmaking")
    async with trio.open_nursery() as nursery:
        peers = sorted(await start_peers(nursery, 4), key=lambda p: str(p.peer_id))
        averagers = [Averager(p, target_group_size=2, matchmaking_budget=10) for p in peers]
        for averager in averagers:
            averager.matchmaker.swarm_size = 4  # several groups: all four are awaited before a split
        late = averagers[0].matchmaker
        candidates, reads = late._candidates, []

        async def missing_one_seeker_until_others_left(seeking):
            found, left = await candidates(seeking)
            if not left:
                found.pop(max(p for p in found if p != late.me), None)
            reads.append((len(found), left))
            return found, left

        late._candidates = missing_one_seeker_until_others_left

        async def three_declared():
            return len(await late.dht.get(late._key("k")[0], every_replica=True)) >= 3

        results = await average_with_the_first_last(averagers, three_declared)
        assert reads[0] == (3, 0) and reads[-1] == (2, 2), reads  # the race happened as described
        # its partner never gave up on it (it then recovered only by accepting, on a retry, the
        # invitation of the peer it had given up on)
        assert not [r for r in caplog.records if "never invited" in r.getMessage()]
        groups = {tuple(sorted(r.stats.contributors)) for r in results.values()}
        assert len(results) == 4 and len(groups) == 2 and all(len(g) == 2 for g in groups), groups
        nursery.cancel_scope.cancel()


async def test_a_follower_whose_split_missed_the_leader_reads_again_at_its_invitation_and_joins(caplog):
    """4 peers in one group of 4: the one with the largest id read only the other two followers
    (its reads missed the smallest id, which came later) and split them at its budget's end,
    waiting for the second smallest to lead. The smallest then read all four and invited it: it
    reads again, splits anew with the inviter in view, and joins. Before, it refused the
    invitation (its own split named another leader), waited in vain and missed the round, as in a
    bucket of 17 at 64 peers, followers that had read 16 did (``bench/matchmaking_swarm.py``)."""
    caplog.set_level(logging.DEBUG, logger="averaging.matchmaking")
    async with trio.open_nursery() as nursery:
        peers = sorted(await start_peers(nursery, 4), key=lambda p: str(p.peer_id))
        averagers = [Averager(p, target_group_size=4, matchmaking_budget=10) for p in peers]
        lagging = averagers[3].matchmaker
        lagging.budget = 1.0  # it splits the three it read after a second
        first = averagers[0].matchmaker.me
        candidates = lagging._candidates

        async def missing_the_first_until_split(seeking):
            found, left = await candidates(seeking)
            if seeking.leader is None:
                found.pop(first, None)
            return found, left

        lagging._candidates = missing_the_first_until_split
        leaders = []

        async def lagging_split():
            leaders[:] = [s.leader for s in lagging._seekings.values() if s.leader]
            return bool(leaders)

        results = await average_with_the_first_last(averagers, lagging_split)
        assert leaders == [averagers[1].matchmaker.me], leaders  # its split awaited the second smallest
        assert [r for r in caplog.records if "unseen at this peer's split" in r.getMessage()]
        groups = {tuple(sorted(r.stats.contributors)) for r in results.values()}
        assert len(results) == 4 and groups == {tuple(sorted(a.matchmaker.me for a in averagers))}, groups
        nursery.cancel_scope.cancel()


async def average_with_the_first_last(averagers: list[Averager], others_ready) -> dict:
    """Peers 1-3 average under one key; peer 0 joins once ``await others_ready()`` holds (asked
    every 50 ms, for at most 10 s). Their results, by index."""
    results = {}

    async def average(index):
        results[index] = await averagers[index].all_reduce([torch.full((100,), float(index))],
                                                           group_key="k", timeout=30)

    with trio.fail_after(60):
        async with trio.open_nursery() as group:
            for index in (1, 2, 3):
                group.start_soon(average, index)
            with trio.fail_after(10):
                while not await others_ready():
                    await trio.sleep(0.05)
            group.start_soon(average, 0)
    return results
