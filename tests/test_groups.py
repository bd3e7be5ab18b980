"""Group formation from an injected RTT table, and Vivaldi coordinates learning a topology."""

import random

from averaging.groups import Coordinates, form_groups
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
