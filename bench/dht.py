"""DHT benchmark: N Legion peers in several processes on 127.0.0.1.

One more peer in this process times, from the moment the peer processes are launched, how long
until its DHT reads list every peer (then each process's own view is checked to agree), and the
latency of puts and gets. Memory per peer is RSS and PSS from /proc.

    python bench/dht.py --peers 32 [--per-process 8] [--ops 40] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for report.py; last, or bench/dht.py would shadow the dht package

from swarm.cli import setup_logging  # noqa: E402
from report import print_result  # noqa: E402
from swarm.local import PeerProcess, start_peer_process, status_json  # noqa: E402
from swarm.members import live_members  # noqa: E402
from swarm.peer import Peer, PeerConfig  # noqa: E402


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) / 1024
    return fields["Rss"], fields["Pss"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_swarm_and_measure(seed_addr: str, launch, total: int, ops: int) -> dict:
    """Join one measuring peer, launch the other processes, time until this peer's DHT reads list
    every peer, then time puts and gets on keys of their own."""
    peer = Peer(PeerConfig(listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[seed_addr]))
    puts, gets = [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        started = trio.current_time()
        async with trio.open_nursery() as launching:
            launching.start_soon(trio.to_thread.run_sync, launch)
            while (await live_members(peer.dht, "default")).estimate < total + 1:
                if trio.current_time() - started > 120:
                    raise SystemExit(f"fewer than {total + 1} peers visible after 120 s")
                await trio.sleep(0.1)
        all_visible = trio.current_time() - started
        for i in range(ops):
            key = f"/legion/bench/key-{i % 8}"
            began = trio.current_time()
            await peer.dht.store(key, {"i": i, "pad": "x" * 200}, ttl=60)
            puts.append(trio.current_time() - began)
            began = trio.current_time()
            entries = await peer.dht.get(key)
            gets.append(trio.current_time() - began)
            assert entries[peer.peer_id.to_base58()].value["i"] == i, "read did not see the write"
        peer.stop()
    return {"all_visible": all_visible, "puts": puts, "gets": gets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=16, help="peers in the swarm, seed included")
    parser.add_argument("--per-process", type=int, default=8)
    parser.add_argument("--ops", type=int, default=40, help="puts and gets to time")
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    setup_logging(0, quiet=True)

    logs = Path(tempfile.mkdtemp(prefix="legion-bench-dht-"))
    common = ["--listen", "/ip4/127.0.0.1/tcp/0", "--heartbeat", str(args.heartbeat), "--no-train", "--quiet"]
    processes: list[PeerProcess] = []
    try:
        seed = start_peer_process(["--seed", *common], log_dir=logs)
        processes.append(seed)
        counts = []
        remaining = args.peers - 1
        while remaining > 0:
            counts.append(min(args.per_process, remaining))
            remaining -= counts[-1]

        def launch() -> None:
            with ThreadPoolExecutor(len(counts)) as pool:
                processes.extend(pool.map(
                    lambda n: start_peer_process(["--bootstrap", seed.addrs[0], *common], n, log_dir=logs),
                    counts))

        measured = trio.run(run_swarm_and_measure, seed.addrs[0], launch, args.peers, args.ops)
        # Every process's own view agrees (read through a peer of each process); the measuring peer
        # has left by now.
        everyone = {peer_id for process in processes for peer_id in process.peer_ids}
        for process in processes:
            if {p["peer_id"] for p in status_json(process.addrs[0], "--all")} != everyone:
                raise SystemExit(f"the view through {process.addrs[0]} is incomplete")
        puts, gets = measured["puts"], measured["gets"]
        per_peer = [(m[0] / len(p.peer_ids), m[1] / len(p.peer_ids))
                    for p in processes[1:] for m in [memory_mb(p.pid)]]
        seed_rss, seed_pss = memory_mb(seed.pid)
        result = {
            "peers": args.peers,
            "processes": len(processes),
            "seconds_until_all_visible": round(measured["all_visible"], 2),
            "put_median_s": round(statistics.median(puts), 4),
            "put_p90_s": round(percentile(puts, 0.9), 4),
            "get_median_s": round(statistics.median(gets), 4),
            "get_p90_s": round(percentile(gets, 0.9), 4),
            "rss_mb_per_peer": round(statistics.mean(r for r, _ in per_peer), 1) if per_peer else None,
            "pss_mb_per_peer": round(statistics.mean(p for _, p in per_peer), 1) if per_peer else None,
            "single_peer_process_rss_mb": round(seed_rss, 1),
            "single_peer_process_pss_mb": round(seed_pss, 1),
        }
    finally:
        for process in processes:
            process.kill()
    print_result(result, args.json)


if __name__ == "__main__":
    main()
