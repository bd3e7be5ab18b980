"""Averaging worker processes for the tests."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from averaging.worker import start_worker


def start_workers(spawned, seed_addr, out_dir, count, *, size, codec="none", rounds=1, weights=None,
                  group_size=None, extra=()):
    """``count`` worker processes averaging ``standard_normal(size)`` drawn from seeds 0..count-1."""
    weights = weights or [1.0] * count

    def start(i):
        process = start_worker(["--bootstrap", seed_addr, "--size", str(size), "--codec", codec,
                                "--rounds", str(rounds), "--seed", str(i), "--weight", str(weights[i]),
                                "--group-size", str(group_size or count), "--min-group-size", str(group_size or count),
                                "--out", str(out_dir), "--budget", "4", *extra], log_dir=out_dir / "logs")
        process.seed = i
        return process

    with ThreadPoolExecutor(count) as pool:
        workers = list(pool.map(start, range(count)))
    spawned.extend(workers)
    return workers


def results(workers, timeout=120):
    """Every worker's round reports, after it exits, keyed by peer id."""
    return {w.peer_ids[0]: [json.loads(line) for line in w.output_lines(timeout)] for w in workers}


def exact_mean(workers, size, weights, contributors):
    by_id = {w.peer_ids[0]: w.seed for w in workers}
    vectors = {pid: np.random.default_rng(by_id[pid]).standard_normal(size).astype(np.float32) for pid in contributors}
    total = sum(weights[by_id[pid]] for pid in contributors)
    return sum(vectors[pid] * weights[by_id[pid]] for pid in contributors) / total
