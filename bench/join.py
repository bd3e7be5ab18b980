"""Join benchmark: a newcomer fetches an S MB state from K seeders (processes on 127.0.0.1).

    python bench/join.py --seeders 4 --size-mb 100 [--seeder-upload MBIT] [--joiner-download MBIT]
                         [--repeat 3] [--vs-hivemind --hivemind-python /path/to/python] [--json]
    python bench/join.py --seeders 4 --size-mb 20 --seeder-upload 20 --netlab   # on emulated links

Every seeder holds the same synthetic state (weights and momentum, float32, as
``swarm.state_node`` makes it) and caps its upload at ``--seeder-upload`` with its own rate limit
(``--max-upload``), or with --netlab runs seeder i in netlab namespace peer<i> whose uplink is
shaped to that rate (set up first: ``netlab.sh up K+1 --uprate MBIT --delay MS --peer K:delay=0,rate=0``;
the joiner runs unshaped in peer<K>). The joiner finds them through the DHT and downloads the chunks from all at
once. ``seconds`` is the median download time (the manifest fetched; chunks until the last is
verified and on disk); throughput counts the bytes on the wire (zstd chunks). ``efficiency`` is
throughput / min(joiner download, K x seeder upload) when a cap is set. With --vs-hivemind, K
hivemind donors serve the same tensors to ``load_state_from_peers`` in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for report.py; last, or bench/dht.py would shadow the dht package

from report import print_result  # noqa: E402
from swarm.local import PeerProcess, start_process  # noqa: E402

READY = re.compile(r'^\{"ready": .*\}$')
FETCHED = re.compile(r'^\{"(fetched|error)": .*\}$')
HIVEMIND_READY = re.compile(r'^\{"initial_peers": .*\}$')


NETLAB = Path(__file__).resolve().parents[2] / "shared" / "tools" / "netlab" / "netlab.sh"


def state_node(args: argparse.Namespace, index: int, *rest: str) -> list[str]:
    """The command of state node ``index`` (seeders 0..K-1, the joiner K): in netlab namespace
    peer<index> with --netlab, else on loopback."""
    if not args.netlab:
        return [sys.executable, "-m", "swarm.state_node", "--quiet", *rest]
    return ["bash", str(NETLAB), "exec", str(index), sys.executable, "-m", "swarm.state_node", "--quiet",
            "--listen", f"/ip4/10.77.1.{index + 1}/tcp/0", *rest]


def start_seeders(args: argparse.Namespace, work: Path) -> tuple[list[PeerProcess], str, str]:
    """K seeder processes; returns them, the first one's address and the state's digest."""
    cap = ["--max-upload", str(args.seeder_upload)] if args.seeder_upload and not args.netlab else []
    common = ["--make-state", str(args.size_mb), *cap]
    first = start_process(state_node(args, 0, "--seed", "--dir", str(work / "seeder-0"), *common), READY,
                          log_dir=work / "logs", timeout=120)
    ready = json.loads(first.ready_lines[0])
    others = [start_process(state_node(args, i, "--bootstrap", ready["addr"], "--dir", str(work / f"seeder-{i}"),
                                       *common), READY, log_dir=work / "logs", timeout=120)
              for i in range(1, args.seeders)]
    return [first, *others], ready["addr"], ready["digest"]


def join_once(args: argparse.Namespace, work: Path, addr: str, attempt: int) -> dict:
    cap = ["--max-download", str(args.joiner_download)] if args.joiner_download else []
    joiner = start_process(state_node(args, args.seeders, "--bootstrap", addr, "--dir", str(work / f"joiner-{attempt}"), "--fetch",
                                      "--exit-after-fetch", *cap), READY, log_dir=work / "logs", timeout=120)
    try:
        lines = [json.loads(line) for line in joiner.output_lines(timeout=args.timeout) if FETCHED.match(line)]
    finally:
        joiner.kill()
    if not lines or "error" in lines[0]:
        raise SystemExit(f"the joiner failed: {lines[0] if lines else joiner.log_tail()}")
    shutil.rmtree(work / f"joiner-{attempt}", ignore_errors=True)
    return lines[0]


def run_legion(args: argparse.Namespace, work: Path) -> dict:
    seeders, addr, expected = start_seeders(args, work)
    try:
        time.sleep(2 * 2.0)  # two heartbeats: every seeder's holdings are in the DHT
        runs = [join_once(args, work, addr, i) for i in range(args.repeat)]
    finally:
        for process in seeders:
            process.kill()
    if any(r["digest"] != expected for r in runs):
        raise SystemExit("the fetched state differs from the seeders' state")
    median = sorted(runs, key=lambda r: r["fetched"]["seconds"])[len(runs) // 2]["fetched"]
    wire = median["bytes_received"] - median["duplicate_bytes"]
    result = {"seconds": round(median["seconds"], 3), "seconds_all": [round(r["fetched"]["seconds"], 3) for r in runs],
              "size_bytes": median["size_bytes"], "mb_per_s": round(wire / median["seconds"] / 1e6, 2),
              "bytes_per_seeder": sorted(median["per_peer"].values(), reverse=True),
              "duplicate_bytes": median["duplicate_bytes"],
              "duplicate_fraction": round(median["duplicate_bytes"] / median["size_bytes"], 4),
              "identical": True}
    caps = [c * 1e6 / 8 for c in (args.joiner_download, args.seeder_upload and args.seeder_upload * args.seeders) if c]
    result["efficiency"] = round(wire / median["seconds"] / min(caps), 3) if caps else None
    return result


def run_hivemind(args: argparse.Namespace, work: Path) -> dict:
    script = str(Path(__file__).with_name("hivemind_state.py"))
    python = args.hivemind_python
    size = ["--size-mb", str(args.size_mb)]
    first = start_process([python, script, "donor", *size], HIVEMIND_READY, log_dir=work / "logs", timeout=180)
    initial = json.loads(first.ready_lines[0])["initial_peers"]
    donors = [first] + [start_process([python, script, "donor", *size, "--initial-peers", *initial], HIVEMIND_READY,
                                      log_dir=work / "logs", timeout=180) for _ in range(1, args.seeders)]
    try:
        times = []
        for _ in range(args.repeat):
            joiner = start_process([python, script, "joiner", *size, "--initial-peers", *initial],
                                   re.compile(r'^\{"seconds": .*\}$'), log_dir=work / "logs", timeout=args.timeout)
            report = json.loads(joiner.ready_lines[0])
            joiner.output_lines(timeout=60)  # it shuts hivemind down and exits; a kill would orphan its daemons
            if not report["ok"]:
                raise SystemExit("hivemind's joiner did not receive the donor's state")
            times.append(report["seconds"])
    finally:
        for process in donors:
            process.terminate()  # lets the donor stop its p2pd daemon
    return {"hivemind_seconds": round(statistics.median(times), 3), "hivemind_seconds_all": [round(t, 3) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeders", type=int, default=4)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--seeder-upload", type=float, metavar="MBIT", help="each seeder's upload cap")
    parser.add_argument("--joiner-download", type=float, metavar="MBIT", help="the joiner's download cap")
    parser.add_argument("--netlab", action="store_true",
                        help="seeders' uploads shaped by netlab links (--seeder-upload is then the link rate)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--vs-hivemind", action="store_true")
    parser.add_argument("--hivemind-python", default=sys.executable,
                        help="a Python with hivemind==1.1.12 (it lives in a venv of its own)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="legion-bench-join-"))
    result = {"seeders": args.seeders, "size_mb": args.size_mb, "seeder_upload_mbit": args.seeder_upload,
              "joiner_download_mbit": args.joiner_download, "limited_by": "netlab" if args.netlab else "rate limits"}
    try:
        result.update(run_legion(args, work))
        if args.vs_hivemind:
            result.update(run_hivemind(args, work))
            result["ratio"] = round(result["seconds"] / result["hivemind_seconds"], 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_result(result, args.json)


if __name__ == "__main__":
    main()
