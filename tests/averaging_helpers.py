"""Averaging worker processes for the tests."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import trio

from averaging.allreduce import AllReduce, GroupSpec, RoundFailed
from averaging.partition import partition_bounds
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


def group_of(peers, size, codec, **options):
    """A group of in-process ``peers`` averaging ``size`` values, and each member's registered
    ``AllReduce``."""
    members = tuple(sorted(p.peer_id.to_base58() for p in peers))
    by_id = {p.peer_id.to_base58(): p for p in peers}
    addrs = tuple(tuple(str(a) for a in by_id[m].addrs) for m in members)
    spec = GroupSpec("g" * 32, members, addrs, tuple(partition_bounds(size, [1] * len(members))), codec)
    reducers = {m: AllReduce(by_id[m].host, lanes=by_id[m].lanes, **options) for m in members}
    for reducer in reducers.values():
        reducer.register_handlers()
    return spec, reducers, by_id


async def round_of(spec, reducers, vectors, weights, seconds=30, late=None):
    """Every member runs the round at once (those in ``late``, member -> seconds, that much
    later); member -> (result, stats), or the ``RoundFailed``."""
    outcomes = {}

    async def average(member):
        await trio.sleep((late or {}).get(member, 0))
        try:
            outcomes[member] = await reducers[member].run(spec, spec.members.index(member), vectors[member],
                                                          weights[member], deadline=trio.current_time() + seconds)
        except RoundFailed as exc:
            outcomes[member] = exc

    with trio.fail_after(2 * seconds):
        async with trio.open_nursery() as rounds:
            for member in spec.members:
                rounds.start_soon(average, member)
    return outcomes
