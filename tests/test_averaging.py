"""Real averaging worker processes on 127.0.0.1: exactness per codec, weights, faults."""

import numpy as np
import pytest

from averaging_helpers import exact_mean, results, start_workers


@pytest.fixture
def spawned():
    processes = []
    yield processes
    for process in processes:
        process.kill()


def test_four_processes_agree_on_the_exact_weighted_mean(seed, spawned, tmp_path):
    size, weights = 300_001, [1.0, 2.0, 3.0, 4.0]
    workers = start_workers(spawned, seed.addrs[0], tmp_path, 4, size=size, weights=weights)
    reports = results(workers)
    first = next(iter(reports.values()))[0]
    assert first["outcome"] == "ok", reports
    assert sorted(first["contributors"]) == sorted(reports)
    expected = exact_mean(workers, size, weights, first["contributors"])
    for peer_id, [report] in reports.items():
        assert report["outcome"] == "ok" and report["contributors"] == first["contributors"]
        result = np.load(tmp_path / f"{peer_id}-0.npy")
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)
