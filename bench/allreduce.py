"""All-reduce benchmark: N averaging peer processes on 127.0.0.1 (or on netlab links).

    python bench/allreduce.py --peers 4 --size-mb 100 --codec none [--rounds 4] [--vs-hivemind] [--json]
    python bench/allreduce.py --peers 4 --size-mb 100 --kill-after 1.0     # fault: kill one member
    python bench/allreduce.py --peers 4 --size-mb 20 --netlab 50           # on emulated 50 Mbit/s links

Seconds per all-reduce is the median over rounds of the slowest member's exchange phase (the
butterfly itself; matchmaking is reported apart). Bytes sent per peer are compared with the
butterfly bound 2(N-1)/N x compressed size; max_abs_error is against the exact mean of the
inputs. With --vs-hivemind the same work runs through hivemind's DecentralizedAverager in the
same run (bench/hivemind_allreduce.py), timed the same way: its all-reduce phase only.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for report.py; last, or bench/dht.py would shadow the dht package

from averaging.codecs import get_codec  # noqa: E402
from averaging.worker import start_worker  # noqa: E402
from report import print_result  # noqa: E402
from swarm.local import PeerProcess, peer_command, start_process  # noqa: E402


NETLAB = Path(__file__).resolve().parents[2] / "shared" / "tools" / "netlab" / "netlab.sh"


def in_namespace(args: argparse.Namespace, index: int) -> tuple[list[str], str]:
    """Command prefix and listen address of peer ``index``: netlab namespace ``peer<index>`` with
    --netlab (the seed goes to the namespace after the workers', set up unshaped), else loopback."""
    if not args.netlab:
        return [], "/ip4/127.0.0.1/tcp/0"
    return ["bash", str(NETLAB), "exec", str(index)], f"/ip4/10.77.1.{index + 1}/tcp/0"


def run_legion(args: argparse.Namespace, values: int, logs: Path) -> dict:
    processes: list[PeerProcess] = []
    try:
        prefix, listen = in_namespace(args, args.peers)
        seed = start_process([*prefix, *peer_command("--seed", "--no-train", "--listen", listen, "--quiet")],
                             re.compile(r"^seed (\S+) listening on (\S+)"), log_dir=logs)
        seed_addr = seed.ready_lines[0].split()[-1]
        processes.append(seed)

        def start(i: int) -> PeerProcess:
            prefix, listen = in_namespace(args, i)
            return start_worker(
                ["--bootstrap", seed_addr, "--listen", listen, "--size", str(values), "--codec", args.codec,
                 "--rounds", str(args.rounds), "--seed", str(i), "--group-size", str(args.peers),
                 "--min-group-size", str(args.peers - (1 if args.kill_after else 0)), "--out", str(logs),
                 "--save", "first", "--budget", "10", "--timeout", str(args.timeout),
                 "--send-concurrency", str(args.send_concurrency), *([] if args.lanes else ["--no-lanes"]),
                 *([] if args.verbose or args.kill_after else ["--quiet"])],  # the kill waits for an INFO line
                prefix=prefix, log_dir=logs)

        with ThreadPoolExecutor(args.peers) as pool:
            workers = list(pool.map(start, range(args.peers)))
        processes += workers
        killed_at = None
        if args.kill_after:
            victim = workers[-1]
            while "starts:" not in victim.log_tail(50):
                time.sleep(0.02)
            time.sleep(args.kill_after)
            victim.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            workers = workers[:-1]
        reports = {w.peer_ids[0]: [json.loads(line) for line in w.output_lines(timeout=args.timeout * (args.rounds + 1))]
                   for w in workers}
        if killed_at is not None:
            first = {pid: r[0] for pid, r in reports.items()}
            return {"killed_after_s": args.kill_after,
                    "survivor_outcomes": sorted({r["outcome"] for r in first.values()}),
                    "survivor_round_seconds_max": round(max(r["seconds"] for r in first.values()), 2),
                    "consistent": len({(r["outcome"], tuple(sorted(r.get("contributors", []))))
                                       for r in first.values()}) == 1}
        failed = [r for rounds in reports.values() for r in rounds if r["outcome"] != "ok"]
        if failed:
            raise SystemExit(f"{len(failed)} failed rounds: {failed[0]}")
        per_round = [max(reports[p][r]["phase_seconds"]["exchange"] for p in reports) for r in range(args.rounds)]
        whole = [max(reports[p][r]["seconds"] for p in reports) for r in range(args.rounds)]
        sent = [statistics.mean(reports[p][r]["bytes_sent"] for p in reports) for r in range(args.rounds)]
        rng_inputs = [np.random.default_rng(i).standard_normal(values).astype(np.float32) for i in range(args.peers)]
        exact = sum(rng_inputs) / args.peers
        error = max(float(np.abs(np.load(logs / f"{p}-0.npy") - exact).max()) for p in reports)
        return {"seconds": round(statistics.median(per_round), 3),
                "seconds_per_round": [round(s, 3) for s in per_round],
                "seconds_with_matchmaking": round(statistics.median(whole), 3),
                "bytes_sent_per_peer": int(statistics.median(sent)),
                "max_abs_error": error}
    finally:
        for process in processes:
            process.kill()


def run_hivemind(args: argparse.Namespace, values: int, logs: Path) -> dict:
    script = Path(__file__).with_name("hivemind_allreduce.py")
    python = args.hivemind_python
    first = start_process([python, str(script), "--size", str(values), "--peers", str(args.peers),
                           "--rounds", str(args.rounds), "--seed", "0"],
                          re.compile(r'^\{"initial_peers": .*\}$'), log_dir=logs, timeout=120)
    initial = json.loads(first.ready_lines[0])["initial_peers"]
    others = [start_process([python, str(script), "--size", str(values), "--peers", str(args.peers),
                             "--rounds", str(args.rounds), "--seed", str(i), "--initial-peers", *initial],
                            re.compile(r'^\{"initial_peers": .*\}$'), log_dir=logs, timeout=120)
              for i in range(1, args.peers)]
    try:
        reports = [json.loads(line) for p in [first, *others] for line in p.output_lines(timeout=900)]
    finally:
        for p in [first, *others]:
            p.kill()
    rounds = [r for r in reports if "allreduce_seconds" in r]
    per_round = [max(r["allreduce_seconds"] for r in rounds if r["round"] == k) for k in range(args.rounds)
                 if any(r["round"] == k for r in rounds)]
    if not per_round:
        raise SystemExit(f"hivemind produced no rounds: {reports}")
    return {"hivemind_seconds": round(statistics.median(per_round), 3),
            "hivemind_seconds_per_round": [round(s, 3) for s in per_round]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--size-mb", type=float, default=100.0, help="float32 megabytes averaged")
    parser.add_argument("--codec", default="none")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--send-concurrency", type=int, default=0,
                        help="owners a member sends its contributions to at once (0: all; 1 where CPU is short, "
                             "as with 8 peers on 2 cores)")
    parser.add_argument("--no-lanes", dest="lanes", action="store_false",
                        help="peers move the data on libp2p streams, not lanes (averaging/lanes.py)")
    parser.add_argument("--kill-after", type=float, help="kill one member this many seconds into round 0")
    parser.add_argument("--vs-hivemind", action="store_true")
    parser.add_argument("--hivemind-python", default=sys.executable,
                        help="a Python with hivemind==1.1.12 (it pins protobuf 7, which py-libp2p 0.8 refuses, "
                             "so it lives in a venv of its own)")
    parser.add_argument("--netlab", type=float, metavar="MBIT",
                        help="run peer i in netlab namespace peer<i> whose links are shaped to MBIT "
                             "(set up first: netlab.sh up N+1 --rate MBIT --delay MS --peer N:delay=0,rate=0)")
    parser.add_argument("--verbose", action="store_true", help="peers log at INFO (logs in the temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    values = int(args.size_mb * 1e6 / 4)
    logs = Path(tempfile.mkdtemp(prefix="legion-bench-allreduce-"))
    result = {"peers": args.peers, "size_mb": args.size_mb, "codec": args.codec, "values": values,
              "send_concurrency": args.send_concurrency}
    if args.kill_after:
        result.update(run_legion(args, values, logs))
    else:
        result.update(run_legion(args, values, logs))
        result["bound_bytes"] = int(2 * (args.peers - 1) / args.peers * get_codec(args.codec).encoded_size(values))
        result["bytes_over_bound"] = round(result["bytes_sent_per_peer"] / result["bound_bytes"] - 1, 4)
        if args.netlab:
            result["link_mbit"] = args.netlab
            result["bandwidth_bound_s"] = round(result["bytes_sent_per_peer"] * 8 / (args.netlab * 1e6), 3)
            result["seconds_over_bandwidth_bound"] = round(result["seconds"] / result["bandwidth_bound_s"], 3)
        if args.vs_hivemind:
            result.update(run_hivemind(args, values, logs))
            result["ratio"] = round(result["seconds"] / result["hivemind_seconds"], 3)
    print_result(result, args.json)


if __name__ == "__main__":
    main()
