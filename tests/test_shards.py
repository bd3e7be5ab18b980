"""Shard ownership: the layout, bids in signed DHT entries, and the assignment every peer computes."""

import random
import time

import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from dht.records import decode_bundle_lenient, sign_entry
from shards.assignment import assign
from shards.bids import Bid, bids_key, parse_bid, read_bids, seen_of
from shards.layout import ShardLayout
from peer_helpers import start_peers

NOW = time.time()
LAYOUT = ShardLayout(total=1_000_003, count=16)
STATE = 4  # bytes of optimizer state per parameter (one float32 momentum)


def bid(peer: str, upload: float = 10.0, memory: int = 1 << 30, hours: float = 1.0) -> Bid:
    return Bid(peer, memory, upload, NOW - hours * 3600, NOW)


def test_the_layout_covers_every_value_once():
    covered = [LAYOUT.bounds(s) for s in range(LAYOUT.count)]
    assert covered[0][0] == 0 and covered[-1][1] == LAYOUT.total
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    assert max(LAYOUT.size(s) for s in range(16)) - min(LAYOUT.size(s) for s in range(16)) <= 1
    with pytest.raises(ValueError):
        ShardLayout(total=3, count=4)


def test_every_peer_computes_the_same_assignment_from_the_same_bids():
    bids = [bid(f"peer{i}", upload=5 + 7 * i) for i in range(7)]
    reference = assign(bids, LAYOUT, 2, state_bytes_per_value=STATE, salt="run")
    for _ in range(5):
        shuffled = random.sample(bids, len(bids))
        assert assign(shuffled, LAYOUT, 2, state_bytes_per_value=STATE, salt="run") == reference
    assert all(len(set(owners)) == 2 for owners in reference.owners)  # two distinct replicas each
    counts = {b.peer_id: len(reference.shards_of(b.peer_id)) for b in bids}
    assert sum(counts.values()) == 32
    # quotas proportional to capacity: the strongest peer owns more than the weakest, and not everything
    assert counts["peer6"] > counts["peer0"] and counts["peer6"] <= 32 * (5 + 42) / sum(5 + 7 * i for i in range(7)) + 1


def test_peers_of_nearly_equal_capacity_own_equal_shares():
    """Eight peers up for 1 hour give or take a few seconds: 16 shards x 2 replicas are 4 each (r/N),
    not 5 for some and 3 for others."""
    bids = [bid(f"peer{i}", hours=1 + (i - 4) / 3600) for i in range(8)]
    assignment = assign(bids, LAYOUT, 2, state_bytes_per_value=STATE, salt="run")
    assert sorted(len(assignment.shards_of(b.peer_id)) for b in bids) == [4] * 8


def test_renewed_bids_of_the_same_peers_give_the_same_owners():
    """Seven peers of equal upload share 32 replicas 5, 5, 5, 5, 4, 4, 4: which ones get the spare
    replica must not hang on the seconds of uptime each bid shows as it is renewed, or the owners
    every peer computes change with every bid it reads (a swarm on 10 Mbit/s links changed owners
    169 times in 6 rounds)."""
    started = [NOW - 600 - i for i in range(7)]
    first = assign([Bid(f"peer{i}", 1 << 30, 10.0, s, NOW) for i, s in enumerate(started)], LAYOUT, 2,
                   state_bytes_per_value=STATE, salt="run")
    for renewal in range(1, 6):  # each bid renewed a few seconds apart, in another order each time
        renewed = [Bid(f"peer{i}", 1 << 30, 10.0, s, NOW + renewal * 5 + (i * renewal) % 7)
                   for i, s in enumerate(started)]
        assert assign(renewed, LAYOUT, 2, state_bytes_per_value=STATE, salt="run") == first


def test_a_departed_owner_loses_its_shards_and_the_rest_mostly_stay():
    bids = [bid(f"peer{i}") for i in range(8)]
    before = assign(bids, LAYOUT, 2, state_bytes_per_value=STATE, salt="run")
    after = assign(bids[:-1], LAYOUT, 2, state_bytes_per_value=STATE, salt="run")
    assert not after.shards_of("peer7") and not after.under_replicated(2)
    kept = sum(len(set(a) & set(b)) for a, b in zip(before.owners, after.owners))
    lost = len(before.shards_of("peer7"))
    assert kept >= 32 - lost - 6  # few ownerships move beyond the departed peer's own (balance moves some)


def test_memory_bounds_how_many_shards_a_peer_owns():
    per_shard = LAYOUT.size(0) * STATE + 4
    bids = [bid("big", upload=1000, memory=per_shard * 3), *(bid(f"p{i}") for i in range(4))]
    result = assign(bids, LAYOUT, 2, state_bytes_per_value=STATE, salt="run")
    assert len(result.shards_of("big")) == 3  # its bandwidth would win many; its memory holds 3
    assert assign([], LAYOUT, 2, state_bytes_per_value=STATE, salt="run").under_replicated(2) == list(range(16))
    alone = assign([bid("solo")], LAYOUT, 2, state_bytes_per_value=STATE, salt="run")
    assert all(owners == ("solo",) for owners in alone.owners)


@pytest.mark.parametrize("value", [
    {"mem": -1, "up": 10.0, "since": NOW - 10, "at": NOW},
    {"mem": 1 << 60, "up": 10.0, "since": NOW - 10, "at": NOW},
    {"mem": 1 << 30, "up": float("inf"), "since": NOW - 10, "at": NOW},
    {"mem": 1 << 30, "up": 1e9, "since": NOW - 10, "at": NOW},
    {"mem": 1 << 30, "up": 10.0, "since": NOW + 3600, "at": NOW + 3600},
    {"mem": 1 << 30, "up": 10.0, "since": NOW, "at": NOW - 10},
    {"mem": 1 << 30, "up": 10.0, "since": NOW - 10},
    {"mem": 1 << 30, "up": 10.0, "since": NOW - 10, "at": NOW, "seen": {"abc": float("nan")}},
    {"mem": 1 << 30, "up": 10.0, "since": NOW - 10, "at": NOW, "seen": {"abc": "fast"}},
    {"mem": 1 << 30, "up": 10.0, "since": NOW - 10, "at": NOW, "seen": {"a" * 11: 5.0}},
    {"mem": 1 << 30, "up": 10.0, "since": NOW - 10, "at": NOW, "seen": {f"p{i}": 5.0 for i in range(9)}},
    {"mem": 1 << 30, "up": 10.0, "since": NOW - 10, "at": NOW, "seen": [["abc", 5.0]]},
    "everything",
])
def test_absurd_or_malformed_bids_are_rejected(value):
    with pytest.raises(ValueError):
        parse_bid("p", value, now=NOW)


def test_a_bid_carries_the_fastest_uploads_its_peer_measured_and_reads_back_the_same():
    from shards.bids import MAX_SEEN, SEEN_ID_CHARS

    measured = {f"12D3KooWpeer{i:02d}": float(i) for i in range(20)}
    mine = Bid("me", 1 << 30, 10.0, NOW - 10, NOW, seen_of(measured))
    # the fastest, each rounded down to a power of two (so that bids change only when one doubles)
    assert MAX_SEEN == 8 and sorted(mbit for _, mbit in mine.seen) == [8.0] * 4 + [16.0] * 4  # of 12..19
    assert all(len(suffix) == SEEN_ID_CHARS for suffix, _ in mine.seen)
    assert parse_bid("me", mine.to_value(), now=NOW) == mine
    assert "seen" not in bid("quiet").to_value()  # a bid without measurements stays as small as before


def test_a_forged_bid_does_not_verify():
    key = bids_key("default", "run")
    honest, forger = create_new_key_pair(), create_new_key_pair()
    entry = sign_entry(key, honest, bid("x").to_value(), ttl=10)
    forged = sign_entry(key, forger, bid("x", upload=1e4).to_value(), ttl=10)
    stolen = [entry.to_wire()[0], *forged.to_wire()[1:]]  # the forger's bid under the honest peer's id
    entries, problems = decode_bundle_lenient(key, msgpack.packb([entry.to_wire(), stolen], use_bin_type=True))
    assert [e.subkey for e in entries] == [entry.subkey] and len(problems) == 1


async def test_bids_published_by_peers_are_read_back_by_another():
    async with trio.open_nursery() as nursery:
        seed, other = await start_peers(nursery, 2)
        key = bids_key("default", "run")
        await seed.dht.store(key, bid("ignored").to_value(), 10)
        await other.dht.store(key, {"mem": -5, "up": 1.0, "since": NOW, "at": NOW}, 10)  # absurd: dropped
        got = await read_bids(other.dht, "default", "run")
        assert [b.peer_id for b in got] == [seed.peer_id.to_base58()]  # the id is the signer's, not the value's
        nursery.cancel_scope.cancel()


def outer_steps(total: int, rounds: int):
    """Start weights, a gradient per round, and the weights after each unsharded outer step."""
    import torch

    from optim.diloco import OuterNesterov

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(total, generator=generator)
    gradients = [torch.randn(total, generator=generator) for _ in range(rounds)]
    reference, expected = OuterNesterov(total, 0.7, 0.9), []
    w = weights.clone()
    for g in gradients:
        reference.step(w, g)
        expected.append(w.clone())
    return weights, gradients, expected


OUTER_LAYOUT = ShardLayout(total=12_000, count=6)  # the ShardedOuter tests' model


def outer_owners(bids: list[Bid], replicas: int):
    """The ShardedOuter tests' assignment of ``OUTER_LAYOUT`` among ``bids``."""
    return assign(bids, OUTER_LAYOUT, replicas, state_bytes_per_value=STATE, salt="r")


def sharded_outers(peers, assignment, candidates):
    """A registered ``ShardedOuter`` per peer (outer lr 0.7, momentum 0.9, as ``outer_steps``)."""
    from optim.base import weights_digest
    from shards.outer import ShardedOuter

    outers = [ShardedOuter(p.host, OUTER_LAYOUT, lr=0.7, momentum=0.9, run_id="r", assignment=assignment,
                           peers=candidates, digest=weights_digest, timeout=3) for p in peers]
    for outer in outers:
        outer.register()
    return outers


async def three_sharded_peers(nursery, replicas: int):
    """Three peers owning ``OUTER_LAYOUT`` with ``replicas`` owners per shard, in a fixed view: their
    ids, the view and their ``ShardedOuter``s."""
    peers = await start_peers(nursery, 3)
    ids = [p.peer_id.to_base58() for p in peers]
    view = outer_owners([bid(i) for i in ids], replicas)
    return ids, view, sharded_outers(peers, lambda: view, lambda: ids)


async def step_and_check(outers, active, round_, current, gradient, expected) -> None:
    """Peers ``active`` average round ``round_`` as one group whose mean is ``gradient``: the
    leader orders the vector, each member turns its part into the step direction, every member
    steps with the whole direction. Each must give the unsharded weights ``expected`` (up to the
    rounding of the momentum, which owners keep as (p + mu m) / (1 + mu)), all the same bits, and
    every shard's holders must hold bit-identical momentum, keyed to the new weights."""
    import numpy as np
    import torch

    from averaging.allreduce import GroupSpec
    from optim.base import weights_digest

    members = sorted(outers[i].me for i in active)
    by_id = {outers[i].me: i for i in active}
    base = weights_digest(current[active[0]])
    assert all(weights_digest(current[i]) == base for i in active)  # a group agrees on its weights
    order, bounds = outers[by_id[members[0]]].plan(round_, base).order(members)
    spec = GroupSpec("g", tuple(members), tuple(() for _ in members), tuple(bounds), "none", 0, tuple(order))
    spec.validate()
    permutation = spec.permutation()
    mean = gradient.numpy()[permutation]
    direction = np.empty_like(mean)

    async def reduce_part(me):
        start, end = spec.part(me)
        transform = await outers[by_id[members[me]]].plan(round_, base).prepare(spec, me)
        direction[start:end] = transform(start, end, mean[start:end])

    async with trio.open_nursery() as parts:
        for me in range(len(members)):
            parts.start_soon(reduce_part, me)
    natural = np.empty_like(direction)
    natural[permutation] = direction
    results = {}

    async def step(i):
        results[i] = await outers[i].step(round_, base, current[i], torch.from_numpy(natural))

    async with trio.open_nursery() as steps:
        for i in active:
            steps.start_soon(step, i)
    for i in active:
        assert torch.equal(results[i], results[active[0]]), (round_, i)
        torch.testing.assert_close(results[i], expected, rtol=1e-5, atol=1e-5)
        current[i] = results[i]
    assert_holders_agree(outers, active, round_, results[active[0]])


def assert_holders_agree(outers, stepped, round_: int, weights) -> None:
    """After round ``round_`` stepped ``stepped`` to ``weights``: every shard's momentum for the
    next round of those weights is held by some of them, and all their copies are bit-identical."""
    import torch

    from optim.base import weights_digest

    after = (round_ + 1, weights_digest(weights))
    for shard in range(outers[0].layout.count):
        held = [outers[i].history[shard][after] for i in stepped if after in outers[i].history.get(shard, {})]
        assert held and all(torch.equal(h, held[0]) for h in held[1:]), (round_, shard)


async def test_sharded_outer_steps_match_the_unsharded_optimizer_and_survive_an_owner_leaving():
    """Three peers own 6 shards twice over; their outer steps equal the unsharded Nesterov step
    (up to rounding), each holds only its shards' momentum, and when one leaves its replicas carry
    on with no momentum lost."""
    pytest.importorskip("torch")
    weights, gradients, expected = outer_steps(OUTER_LAYOUT.total, 7)

    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        ids = [p.peer_id.to_base58() for p in peers]
        live = list(ids)
        view = {"now": outer_owners([bid(i) for i in live], 2)}
        outers = sharded_outers(peers, lambda: view["now"], lambda: live)
        # hostile requests get "none" or a closed stream, never a crash
        from averaging.wire import FrameError, read_frame, write_frame
        from libp2p.peer.id import ID
        from shards.outer import PROTOCOL
        for request in ({"t": "state", "run": "r", "round": "x", "shard": -1},
                        {"t": "update", "run": "r", "round": 0, "shard": 1}, {"t": 5}):
            stream = await peers[1].host.new_stream(ID.from_base58(ids[0]), [PROTOCOL])
            await write_frame(stream, request)
            reply, payload = await read_frame(stream, 1 << 20)
            assert reply == {"t": "none"} and payload == b""
        stream = await peers[1].host.new_stream(ID.from_base58(ids[0]), [PROTOCOL])
        await stream.write(b"\xff" * 64)  # an absurd frame length: the stream is closed
        with pytest.raises(FrameError):
            await read_frame(stream, 1 << 20)
        current = [weights.clone() for _ in outers]
        for round_, g in enumerate(gradients):
            if round_ == 4:  # peer 2 leaves; the others see the new assignment
                peers[2].stop()
                live.remove(ids[2])
                view["now"] = outer_owners([bid(i) for i in live], 2)
            active = [i for i, p in enumerate(ids) if p in live]
            await step_and_check(outers, active, round_, current, g, expected[round_])
            if round_ == 3:  # two replicas per shard over three peers: each holds about 2/3 of the momentum
                assert sum(o.state_bytes for o in outers) == 2 * STATE * OUTER_LAYOUT.total
                assert max(o.state_bytes for o in outers) <= STATE * OUTER_LAYOUT.size(0) * 5
        survivors = outers[:2]
        assert all(o.stats.momentum_lost == 0 for o in survivors)
        assert sum(o.stats.momentum_handovers for o in survivors) > 0  # shards the leaver owned moved
        assert all(o.state_bytes == STATE * OUTER_LAYOUT.total for o in survivors)  # two peers, two replicas: all
        nursery.cancel_scope.cancel()


async def test_a_stronger_newcomer_outbids_owners_and_takes_their_shards_over_with_no_step_lost():
    """Two peers own 6 shards with one replica each; a peer with ten times their upload (as one of
    them measured it: ``shards.bids.believed_uploads``) joins at round 3 and wins most shards. It takes each shard's momentum from the peer that owned it (which
    keeps it two rounds for that), and every step of every peer stays the unsharded one."""
    pytest.importorskip("torch")
    weights, gradients, expected = outer_steps(OUTER_LAYOUT.total, 6)
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        ids = [p.peer_id.to_base58() for p in peers]
        bids = {ids[0]: bid(ids[0]), ids[1]: bid(ids[1])}
        view = {"now": outer_owners(list(bids.values()), 1)}
        outers = sharded_outers(peers, lambda: view["now"], lambda: list(bids))
        current = [weights.clone() for _ in outers]
        owned_before = None
        for round_, g in enumerate(gradients):
            if round_ == 3:
                owned_before = {p: view["now"].shards_of(p) for p in ids[:2]}
                bids[ids[2]] = bid(ids[2], upload=100.0)
                bids[ids[0]] = Bid(ids[0], 1 << 30, 10.0, NOW - 3600, NOW, seen_of({ids[2]: 80.0}))
                view["now"] = outer_owners(list(bids.values()), 1)
                current[2] = current[0].clone()  # the newcomer holds the swarm's weights (a fetched checkpoint)
            active = [i for i, p in enumerate(ids) if p in bids]
            await step_and_check(outers, active, round_, current, g, expected[round_])
        taken = view["now"].shards_of(ids[2])
        assert len(taken) >= 4  # ten times the others' upload: most of the shards
        assert all(len(owners) == 1 for owners in view["now"].owners)
        assert set(taken) & set(owned_before[ids[0]]) and set(taken) & set(owned_before[ids[1]])
        assert outers[2].stats.momentum_handovers == len(taken) and outers[2].stats.momentum_lost == 0
        # the outbid peers hold only what they still own; the newcomer holds what it took
        assert outers[2].state_bytes == STATE * sum(OUTER_LAYOUT.size(s) for s in taken)
        assert all(outers[i].state_bytes == STATE * sum(OUTER_LAYOUT.size(s) for s in view["now"].shards_of(ids[i]))
                   for i in range(2))
        nursery.cancel_scope.cancel()


async def test_a_group_without_a_shards_owner_reduces_it_with_the_momentum_of_the_owner_outside():
    """Three peers own 6 shards once each; round 1 averages in a group of two. The shards of the
    peer outside go to a member of the group, which takes their momentum from that peer: the
    group's step is the unsharded one, and no momentum restarts from zero."""
    pytest.importorskip("torch")
    weights, gradients, expected = outer_steps(OUTER_LAYOUT.total, 2)
    async with trio.open_nursery() as nursery:
        ids, view, outers = await three_sharded_peers(nursery, 1)
        current = [weights.clone() for _ in outers]
        await step_and_check(outers, [0, 1, 2], 0, current, gradients[0], expected[0])
        outside = view.shards_of(ids[2])
        assert outside  # the peer left out owns some shards
        await step_and_check(outers, [0, 1], 1, current, gradients[1], expected[1])
        assert sum(o.stats.momentum_handovers for o in outers[:2]) == len(outside)
        assert all(o.stats.momentum_lost == 0 for o in outers)
        nursery.cancel_scope.cancel()


# (without a codec: slow, ~17 s; int8 checks more: every group's owners encode a shard alike)
@pytest.mark.parametrize("codec, tolerance", [pytest.param("none", 1e-5, marks=pytest.mark.slow), ("int8", 0.05)])
async def test_sharded_rounds_of_several_groups_reduce_each_shard_across_them_and_keep_one_set_of_weights(
        codec, tolerance):
    """Five peers, groups of at most three, 6 shards with 2 owners each: each round forms two
    groups, and each group's reducer of a shard reduces it with the other group's reducer before
    it takes the Nesterov step from the shard's momentum. Every peer gets the same direction, bit
    for bit, the unsharded step of the mean of all contributions (up to the codec's rounding);
    every shard's holders keep the same momentum; none is lost. (Before, each group stepped with
    its own mean and the swarm's weights parted every round; and with int8, whose blocks of 256
    values do not fit shards of 2,000, each group rounded a shard's step its own way until a
    shard's chunks started at the shard.)"""
    import numpy as np
    import torch

    from averaging.allreduce import RoundFailed
    from averaging.averager import Averager
    from averaging.matchmaking import MatchmakingFailed
    from optim.base import weights_digest
    from optim.diloco import OuterNesterov

    generator = torch.Generator().manual_seed(1)
    total, weights = OUTER_LAYOUT.total, [1.0, 2.0, 3.0, 4.0, 5.0]
    start = torch.randn(total, generator=generator)
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 5)
        ids = [p.peer_id.to_base58() for p in peers]
        view = outer_owners([bid(i) for i in ids], 2)
        outers = sharded_outers(peers, lambda: view, lambda: ids)
        averagers = [Averager(p, target_group_size=3, matchmaking_budget=5) for p in peers]
        current = {i: start.clone() for i in range(5)}
        reference = OuterNesterov(total, 0.7, 0.9)
        expected = start.clone()
        for round_ in range(2):
            taking_part = sorted(current)
            base = weights_digest(current[taking_part[0]])
            gradients = {i: torch.randn(total, generator=generator) for i in taking_part}
            results = {}

            async def average(i):
                averagers[i].matchmaker.swarm_size = len(taking_part)
                try:
                    results[i] = await averagers[i].all_reduce(
                        [gradients[i]], weight=weights[i], codec=codec, group_key=f"r{round_}", timeout=60,
                        plan=outers[i].plan(round_, base), base=base, across_groups=True)
                except (MatchmakingFailed, RoundFailed) as exc:  # left alone by its view: not in the round
                    results[i] = exc

            with trio.fail_after(120):
                async with trio.open_nursery() as rounds:
                    for i in taking_part:
                        rounds.start_soon(average, i)
            averaged = {i: r for i, r in results.items() if not isinstance(r, Exception)}
            assert len({r.stats.group_id for r in averaged.values()}) >= 2, "one group: no second level"
            index = {peer: i for i, peer in enumerate(ids)}
            counted = sorted(index[m] for r in averaged.values() for m in r.stats.contributors)
            assert len(averaged) >= 4 and sorted(set(counted)) == sorted(averaged)  # no partial set
            directions = [r.tensors[0] for r in averaged.values()]
            assert all(torch.equal(directions[0], d) for d in directions[1:])  # bit-identical in every group
            mean = sum(gradients[i] * weights[i] for i in averaged) / sum(weights[i] for i in averaged)
            reference.step(expected, mean)
            stepped = {i: await outers[i].step(round_, base, current[i], directions[0].clone()) for i in averaged}
            for i, new in stepped.items():
                assert torch.equal(new, stepped[min(stepped)])
                np.testing.assert_allclose(new.numpy(), expected.numpy(), rtol=tolerance, atol=tolerance)
            current = stepped
            assert_holders_agree(outers, stepped, round_, stepped[min(stepped)])
        assert all(o.stats.momentum_lost == 0 for o in outers)
        nursery.cancel_scope.cancel()


def test_the_layout_counts_the_models_parameters_without_torch():
    from optim.model import GPT
    from optim.model_config import SIZES

    for name in ("tiny", "mini"):
        assert GPT(SIZES[name]).num_params() == SIZES[name].num_params()


async def test_a_peer_keeps_the_bids_it_has_seen_until_their_leases_end():
    """A DHT read that misses a bid (a loaded node answering late) does not shrink a peer's view of
    the owners; the bid leaves the view once its lease has run out ``LEASE_LIFETIMES`` times."""
    from dataclasses import replace

    from swarm.run_config import RunConfig
    from swarm.shard_ownership import LEASE_LIFETIMES, bid_and_assign

    config = RunConfig(sharded=True).validate()
    async with trio.open_nursery() as nursery:
        seed, other = await start_peers(nursery, 2)
        seed_id, other_id = seed.peer_id.to_base58(), other.peer_id.to_base58()
        key = bids_key("default", config.run_id)
        await seed.dht.store(key, bid("ignored").to_value(), 10)
        mine, seen = bid(other_id), {}
        first = await bid_and_assign(other.dht, "default", config, mine, 10.0, seen)
        assert set(seen) == {seed_id} and all(sorted(o) == sorted([seed_id, other_id]) for o in first.owners)
        await seed.dht.withdraw(key, 10)
        assert [b.peer_id for b in await read_bids(other.dht, "default", config.run_id)] == [other_id]
        second = await bid_and_assign(other.dht, "default", config, mine, 10.0, seen)
        assert second.owners == first.owners  # the read that missed the seed's bid changed nothing
        # the seed's lease (10 s from its renewal) is over, but a late renewal may still come
        later = replace(mine, renewed=NOW + 11)
        assert (await bid_and_assign(other.dht, "default", config, later, 10.0, seen)).owners == first.owners
        much_later = replace(mine, renewed=NOW + 10 * LEASE_LIFETIMES + 1)  # gone for good
        third = await bid_and_assign(other.dht, "default", config, much_later, 10.0, seen)
        assert seen == {} and all(tuple(o) == (other_id,) for o in third.owners)
        nursery.cancel_scope.cancel()


async def test_a_peer_behind_the_holders_is_told_so_and_does_not_count_the_momentum_lost():
    """Holders keep two rounds. A peer that asks for an older round (it restarted from an old
    checkpoint, say) used to count the shard's momentum lost though its replicas live on; holders
    now answer that they are past that round. A round nobody has reached is still "none"."""
    torch = pytest.importorskip("torch")
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        ids = [p.peer_id.to_base58() for p in peers]
        view = outer_owners([bid(i) for i in ids], 2)
        holder, asker = sharded_outers(peers, lambda: view, lambda: ids)
        size = OUTER_LAYOUT.size(3)
        holder.history[3] = {(7, "w"): torch.ones(size), (8, "w"): torch.ones(size)}
        ask = {"t": "state", "run": "r", "base": "w", "shard": 3}
        assert await asker._request(ids[0], {**ask, "round": 5}, size) == "past it: at round 8"
        assert await asker._request(ids[0], {**ask, "round": 9}, size) == "none held"
        assert await asker._acquire((5, "w"), 3, view) is None and asker.stats.momentum_lost == 0
        assert torch.equal(await asker._acquire((7, "w"), 3, view), torch.ones(size))
        assert asker.stats.momentum_handovers == 1
        nursery.cancel_scope.cancel()


async def test_momentum_is_handed_over_only_for_the_weights_it_belongs_to():
    """A holder of a shard's round under other weights (a group that failed a round the swarm
    averaged carries its copy over unchanged) does not hand that copy over: it says so, and a peer
    that needs the momentum of its own weights restarts it from zero, counted lost. Asked ahead of
    need, a miss stores and counts nothing."""
    torch = pytest.importorskip("torch")
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        ids = [p.peer_id.to_base58() for p in peers]
        view = outer_owners([bid(i) for i in ids], 2)
        holder, asker = sharded_outers(peers, lambda: view, lambda: ids)
        size = OUTER_LAYOUT.size(3)
        holder.history[3] = {(7, "parted"): torch.ones(size)}
        ask = {"t": "state", "run": "r", "round": 7, "shard": 3}
        assert await asker._request(ids[0], {**ask, "base": "swarm"}, size) == "of other weights"
        assert torch.equal(await asker._request(ids[0], {**ask, "base": "parted"}, size), torch.ones(size))
        await asker._take_missing((7, "swarm"))
        assert all((7, "swarm") not in copies for copies in asker.history.values()) and asker.stats.momentum_lost == 0
        assert torch.equal(await asker._momentum((7, "swarm"), 3), torch.zeros(size))
        assert asker.stats.momentum_lost == 1
        nursery.cancel_scope.cancel()


async def test_a_peer_that_failed_a_round_the_swarm_averaged_steps_with_the_swarms_momentum_after_adopting():
    """Three peers own 6 shards twice over. Round 1 averages without peer 2, whose round fails: its
    copies carry over unchanged. It then takes the swarm's weights (a fetched state), and in round
    2 the shards it reduces step with the swarm's momentum of those weights, taken from their other
    holders, not with its own stale copies: every step stays the unsharded one."""
    pytest.importorskip("torch")
    from optim.base import weights_digest

    weights, gradients, expected = outer_steps(OUTER_LAYOUT.total, 3)
    async with trio.open_nursery() as nursery:
        _, _, outers = await three_sharded_peers(nursery, 2)
        current = [weights.clone() for _ in outers]
        await step_and_check(outers, [0, 1, 2], 0, current, gradients[0], expected[0])
        await outers[2].skip(1, weights_digest(current[2]))  # its group failed round 1
        await step_and_check(outers, [0, 1], 1, current, gradients[1], expected[1])
        current[2] = current[0].clone()  # it adopts the swarm's state of round 2
        handovers = outers[2].stats.momentum_handovers
        await step_and_check(outers, [0, 1, 2], 2, current, gradients[2], expected[2])
        assert outers[2].stats.momentum_handovers > handovers
        assert all(o.stats.momentum_lost == 0 for o in outers)
        nursery.cancel_scope.cancel()
