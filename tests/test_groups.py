"""Group formation from an injected RTT table, and Vivaldi coordinates learning a topology."""

import random

from averaging.groups import Coordinates, bucket_count, bucket_of, form_groups, plan_groups
from averaging.partition import partition_bounds

REGIONS = {"eu": 10, "us": 100, "asia": 200}  # one-way offsets: RTT within a region ~5 ms, across 90+ ms
PEERS = {f"{region}-{i}": region for region in REGIONS for i in range(4)}


def rtt(a, b):
    return 5.0 if PEERS[a] == PEERS[b] else abs(REGIONS[PEERS[a]] - REGIONS[PEERS[b]]) + 5.0


def test_groups_are_regional_and_every_peer_computes_the_same_split():
    first = form_groups(list(PEERS), rtt, target=4, min_size=2, salt="round-7")
    again = form_groups(list(reversed(PEERS)), rtt, target=4, min_size=2, salt="round-7")
    assert first == again
    assert sorted(p for g in first for p in g) == sorted(PEERS)
    for group in first:
        assert len({PEERS[p] for p in group}) == 1, f"group {group} spans regions"


def test_membership_rotates_and_mixing_rounds_cross_regions():
    splits = {tuple(map(tuple, form_groups(list(PEERS), rtt, 2, 2, salt=f"r{r}"))) for r in range(6)}
    assert len(splits) > 1, "groups never change between rounds"
    mixed = form_groups(list(PEERS), rtt, target=4, min_size=2, salt="r1", mix=True)
    assert any(len({PEERS[p] for p in g}) > 1 for g in mixed)


def test_leftovers_join_the_nearest_group_instead_of_averaging_alone():
    peers = list(PEERS)[:9]  # 4 eu, 4 us, 1 asia
    groups = form_groups(peers, rtt, target=4, min_size=2, salt="x")
    assert sum(len(g) for g in groups) == 9 and all(len(g) >= 2 for g in groups)


def test_vivaldi_coordinates_learn_which_peers_are_near():
    random.seed(1)
    coords = {p: Coordinates() for p in PEERS}
    names = list(PEERS)
    for _ in range(3000):
        a, b = random.sample(names, 2)
        coords[a].update(coords[b], rtt(a, b))
    def dist(a, b):
        return coords[a].distance(coords[b])
    groups = form_groups(names, dist, target=4, min_size=2, salt="learned")
    assert all(len({PEERS[p] for p in g}) == 1 for g in groups), groups


def test_partition_bounds_follow_bandwidth_on_block_boundaries():
    bounds = partition_bounds(1_000_000, [10, 30, None, 0])
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == 1_000_000 and all(b % 256 == 0 for b in bounds[1:-1])
    assert abs(sizes[1] / sizes[0] - 3) < 0.01 and abs(sizes[2] - sizes[3]) <= 256


def test_no_group_holds_two_private_peers_and_each_private_peer_gets_public_ones():
    public, private = [f"pub{i}" for i in range(5)], [f"home{i}" for i in range(3)]
    for salt in ("r1", "r2", "r3"):
        groups = form_groups([*public, *private], lambda a, b: 0.0, target=16, min_size=2, salt=salt,
                             private=frozenset(private))
        assert sorted(p for g in groups for p in g) == sorted([*public, *private])
        assert all(sum(p in private for p in g) <= 1 for g in groups)
        assert all(len(g) >= 2 for g in groups)  # three private peers, three groups with public peers
    # more private peers than public ones: the rest are alone (their rounds fail, loudly)
    groups = form_groups(["pub0", "home0", "home1"], lambda a, b: 0.0, target=16, min_size=2, salt="r",
                         private=frozenset({"home0", "home1"}))
    assert sorted(map(len, groups)) == [1, 2] and all(sum(p.startswith("home") for p in g) <= 1 for g in groups)
    # without private peers nothing changes
    assert form_groups(public, lambda a, b: 0.0, 16, 2, "r") == form_groups(public, lambda a, b: 0.0, 16, 2, "r",
                                                                             private=frozenset({"elsewhere"}))


def test_buckets_nest_rotate_and_hold_about_one_group():
    assert bucket_count(31, 16) == 1 and bucket_count(32, 16) == 2 and bucket_count(1000, 16) == 64
    # small groups: buckets of as many peers on average, so that few draw a single peer
    assert bucket_count(31, 3) == 1 and bucket_count(1000, 3) == 64 and bucket_count(8, 2, bucket_peers=2) == 4
    names = [f"peer{i}" for i in range(1000)]
    for count in (2, 8, 64):
        sizes = [0] * count
        for name in names:
            bucket = bucket_of(name, "/mm/run/diloco-3", count)
            sizes[bucket] += 1
            # a peer that estimates half the swarm seeks in the union of two of these buckets
            assert bucket_of(name, "/mm/run/diloco-3", count // 2) == bucket % (count // 2)
        assert 1000 / count * 0.5 < sum(sizes) / count <= 1000 / count
    moved = sum(bucket_of(n, "/mm/run/diloco-3", 64) != bucket_of(n, "/mm/run/diloco-4", 64) for n in names)
    assert moved > 900  # membership rotates from round to round


def test_a_view_missing_one_entry_changes_only_the_groups_of_that_entrys_bucket():
    """The split's salt is the key alone (it used to count the names seen, so two peers whose views
    differed by one entry computed unrelated splits), and each bucket is split on its own."""
    names = [f"peer{i:03d}" for i in range(200)]
    count = bucket_count(len(names), 16)

    def groups(seen: list[str]) -> dict[int, list[list[str]]]:
        buckets: dict[int, list[str]] = {}
        for name in seen:
            buckets.setdefault(bucket_of(name, "/mm/run/diloco-1", count), []).append(name)
        return {b: plan_groups(sorted(m), lambda a, c: 0.0, 16, 2, f"/mm/run/diloco-1/{count}.{b}", 4)
                for b, m in buckets.items()}

    full = groups(names)
    assert count == 16 and all(len(g) >= 2 for split in full.values() for g in split)
    for missing in names[::9]:
        partial = groups([n for n in names if n != missing])
        home = bucket_of(missing, "/mm/run/diloco-1", count)
        assert {b: s for b, s in partial.items() if b != home} == {b: s for b, s in full.items() if b != home}
        if len(full[home]) == 1:  # the bucket held one group: it lost that entry, nothing else
            assert partial[home] == [[n for n in full[home][0] if n != missing]]
