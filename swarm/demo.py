"""``legion-peer demo``: a local swarm on 127.0.0.1 showing discovery, status and failure detection."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from swarm.cli import format_table
from swarm.local import PeerProcess, start_peer_process, status_json
from swarm.members import Announcement


def _live_line(text: str) -> None:
    if sys.stdout.isatty():
        print(f"\r\033[K{text}", end="", flush=True)


def _wait_for_count(bootstrap: str, want: int, timeout: float, what: str) -> tuple[list[dict], float]:
    started = time.monotonic()
    while True:
        listed = status_json(bootstrap)
        elapsed = time.monotonic() - started
        _live_line(f"  {what}: {len(listed)} live peers, want {want}  ({elapsed:4.1f}s)")
        if len(listed) == want or elapsed > timeout:
            _live_line("")
            return listed, elapsed
        time.sleep(0.3)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="legion-peer demo", description=__doc__)
    parser.add_argument("--processes", type=int, default=3, help="peer processes besides the seed")
    parser.add_argument("--peers-per-process", type=int, default=3)
    parser.add_argument("--heartbeat", type=float, default=2.0)
    parser.add_argument("--logs", type=Path, help="directory for the peers' logs (default: a temp dir)")
    args = parser.parse_args(argv)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="legion-demo-"))
    beat = ["--heartbeat", str(args.heartbeat), "--listen", "/ip4/127.0.0.1/tcp/0"]
    processes: list[PeerProcess] = []
    try:
        print(f"Legion local swarm demo (peer logs in {logs})")
        seed = start_peer_process(["--seed", *beat], log_dir=logs)
        processes.append(seed)
        print(f"1. seed up: {seed.addrs[0]}")
        for _ in range(args.processes):
            processes.append(start_peer_process(["--bootstrap", seed.addrs[0], *beat],
                                                args.peers_per_process, log_dir=logs))
        total = 1 + args.processes * args.peers_per_process
        print(f"2. started {total - 1} more peers in {args.processes} processes; waiting for the DHT to list them")
        listed, took = _wait_for_count(seed.addrs[0], total, 30, "discovery")
        print(f"   all {len(listed)} peers visible after {took:.1f}s:\n")
        print(format_table([Announcement.from_value(p["peer_id"], p) for p in listed]))
        victim = processes[-1]
        victim.kill()
        print(f"\n3. kill -9 of one process ({len(victim.peer_ids)} peers); heartbeat {args.heartbeat:g}s")
        ask = processes[1].addrs[0]
        listed, took = _wait_for_count(ask, total - len(victim.peer_ids), 6 * args.heartbeat, "failure detection")
        print(f"   another peer's view drops them after {took:.1f}s ({took / args.heartbeat:.1f} heartbeats): "
              f"{len(listed)} live peers")
        codes = [p.terminate() for p in processes[:-1]]
        print(f"4. SIGTERM to the rest: exit codes {codes}")
        return 0 if all(code == 0 for code in codes) else 1
    finally:
        for process in processes:
            process.kill()
