"""Group formation from an injected RTT table, and Vivaldi coordinates learning a topology."""

import random

from averaging.groups import Coordinates, form_groups
import pytest

from averaging.allreduce import GroupSpec, SpecError
from averaging.codecs import get_codec
from averaging.partition import CHUNK_VALUES, MIN_CHUNK_VALUES, chunk_values, partition_bounds

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


def test_chunks_are_small_on_slow_links_and_large_on_fast_or_unknown_ones():
    none, int8 = get_codec("none"), get_codec("int8")
    assert chunk_values(None, 4, none) == chunk_values(float("inf"), 4, none) == CHUNK_VALUES
    assert chunk_values(6.25e6, 4, none) == MIN_CHUNK_VALUES  # 50 Mbit/s: the tail of 1 MiB would be 0.5 s
    assert chunk_values(1e8, 4, none) == CHUNK_VALUES
    middle = chunk_values(2.5e7, 4, none)
    assert MIN_CHUNK_VALUES < middle < CHUNK_VALUES and middle % 256 == 0
    assert chunk_values(2.5e7, 4, int8) > middle  # a chunk's bytes count, not its values
    assert chunk_values(2.5e7, 8, none) < middle  # more members wait on an owner's last chunk

    spec = GroupSpec("g", ("a", "b"), ((), ()), (0, 500_000, 1_000_000), "none", 0, middle)
    assert GroupSpec.from_wire(spec.to_wire()) == spec
    assert [b - a for a, b in spec.chunks(1)][:-1] == [middle] * (len(spec.chunks(1)) - 1)
    for bad in (1000, MIN_CHUNK_VALUES + 1, 4 * CHUNK_VALUES):  # a leader's spec is checked too
        with pytest.raises(SpecError, match="chunk"):
            GroupSpec.from_wire({**spec.to_wire(), "chunk": bad})
