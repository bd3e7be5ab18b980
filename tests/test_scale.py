"""The scale simulator (``bench/scale.py``) at N = 200: matchmaking in buckets groups nearly every
peer on the first try, and bucketed keys keep what one DHT node holds and serves bounded."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
import dht_load  # noqa: E402
import scale  # noqa: E402

from dht.buckets import BUCKET_ENTRIES  # noqa: E402


def test_matchmaking_in_buckets_groups_nearly_every_peer_on_the_first_try():
    flat = scale.simulate("flat", 200, 0.01, rounds=2, sample=200, seed=1)
    buckets = scale.simulate("buckets", 200, 0.01, rounds=2, sample=200, seed=1)
    assert buckets["grouped_first_try"] >= 0.95 > flat["grouped_first_try"], (flat, buckets)
    assert buckets["largest_key_entries"] < flat["largest_key_entries"] == 200


def test_bucketed_keys_bound_what_a_node_holds_and_serves_and_estimate_the_swarm():
    costs = dht_load.calibrate(entries=64, repeats=2)
    flat = dht_load.simulate("flat", 200, 0.2, costs, beats=1, seed=1)
    buckets = dht_load.simulate("buckets", 200, 0.2, costs, beats=1, seed=1)
    assert flat["largest_key_entries"] == 200 and buckets["largest_key_entries"] <= 2 * BUCKET_ENTRIES + 16
    low, high = buckets["board_estimate_min_max"]
    assert 0.5 <= low <= high <= 2.0, buckets
    for figure in ("busiest_node_mbps", "busiest_node_cpu", "peer_background_kbps"):
        assert buckets[figure] < flat[figure] / 3, (figure, flat, buckets)
