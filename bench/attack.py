"""Attack benchmark: a training swarm in which M peers attack the honest ones.

    python bench/attack.py --peers 8 --malicious 1 [--attack NAME ...] [--rounds R] [--json]

For each attack (``bench/attacker.py``; all of them by default, ``bid-inflate`` with ``--sharded``)
N - M honest peer processes and M attacking ones train the tiny GPT (``--model``) on 127.0.0.1; the same N - M
honest peers (same identities, so the same batches) train once with no attacker. Per attack:

- ``honest_crashed``: honest peers that exited non-zero, printed a traceback, or never said ``done``;
- ``rounds_failed``: the most rounds any honest peer saw fail; ``rounds_averaged``: the fewest it averaged;
- ``val_loss`` (the honest peers' mean) against ``clean_val_loss``, and ``loss_ratio``;
- ``weights_spread``: the largest difference of final validation loss between honest peers (0: the
  same weights);
- ``adopted_foreign_state``: whether any honest peer ever took a state of a round no honest peer
  reached (the forged one).

With ``--link-mbit R`` every peer runs on its own host (``tests/netns_helpers.Lab``; root) behind an
access link of R Mbit/s each way, so what peers measure of each other's uploads is a real link's
rate: ``bid-inflate``'s claim of 100 Gbit/s then meets the bound on bids (``shards.bids.believed_uploads``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for report.py and attacker.py, after the packages

from attacker import ATTACKS, FORGED_ROUND  # noqa: E402
from report import print_result  # noqa: E402
from run_file import run_file  # noqa: E402
from swarm.local import READY, PeerProcess, PeerProcessError, start_peer_process, start_process  # noqa: E402
from optim.model_config import SIZES  # noqa: E402
from swarm.run_config import RunConfig  # noqa: E402
from tests.netns_helpers import Lab  # noqa: E402

ATTACKER = Path(__file__).resolve().parent / "attacker.py"
LAB_INTERNET = "10.202.0"  # the hosts' network with --link-mbit


def metrics_events(peer_out: Path) -> list[dict]:
    """The lines of a peer's ``metrics.jsonl`` (none if it wrote none)."""
    metrics = peer_out / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


def swarm(args: argparse.Namespace, work: Path, attack: str | None) -> dict:
    """One run: the honest peers' summaries and logs, the attackers started beside them."""
    honest_count = args.peers - args.malicious
    total = honest_count + (args.malicious if attack else 0)
    out = work / (attack or "clean")
    lab = Lab(LAB_INTERNET) if args.link_mbit else None
    common = ["--heartbeat", "2", "--threads", "1", "--wait-peers", str(total)]
    if lab is None:
        common += ["--listen", "/ip4/127.0.0.1/tcp/0"]
    else:  # every peer on its own host, its access link rate-limited both ways
        for i in range(total):
            lab.add_host(f"p{i}", i + 1)
            lab.shape(f"p{i}", args.link_mbit, args.link_mbit)

    def own(i: int) -> list[str]:
        return ["--identity", str(work / f"id{i}.key"), "--out", str(out / f"peer{i}"), *common]

    def start_honest(i: int, peer_args: list[str]) -> PeerProcess:
        if lab is None:
            return start_peer_process(peer_args, log_dir=out / "logs")
        return lab.start_peer(f"p{i}", peer_args, out / "logs")

    honest: list[PeerProcess] = []
    attackers: list[PeerProcess] = []
    try:
        honest.append(start_honest(0, ["--seed", "--run", str(run_file(args, work)), *own(0)]))
        bootstrap = honest[0].addrs[0]
        for i in range(1, honest_count):
            honest.append(start_honest(i, ["--bootstrap", bootstrap, *own(i)]))
        for j in range(args.malicious if attack else 0):
            command = [sys.executable, str(ATTACKER), "--attack", attack, "--", "--bootstrap", bootstrap,
                       "--out", str(out / f"attacker{j}"), *common]
            if lab is not None:
                command = lab.command(f"p{honest_count + j}", *command)
            attackers.append(start_process(command, READY, log_dir=out / "logs"))

        def finish(process: PeerProcess) -> dict:
            try:
                lines = process.output_lines(args.timeout)
            except Exception as exc:  # hung past the timeout
                process.kill()
                return {"crashed": f"no exit within {args.timeout}s: {exc}"}
            done = [json.loads(line[5:]) for line in lines if line.startswith("done ")]
            log_text = process.log_path.read_text(errors="replace")
            if process.proc.returncode != 0 or not done or "Traceback" in log_text:
                return {"crashed": f"exit {process.proc.returncode}, done: {bool(done)}, "
                                   f"traceback: {'Traceback' in log_text}", **(done[0] if done else {})}
            return done[0]

        with ThreadPoolExecutor(len(honest)) as pool:
            summaries = list(pool.map(finish, honest))
    finally:
        for process in honest + attackers:
            process.kill()
        if lab is not None:
            lab.close()
    states, measured, events = [], {}, []
    attacker_ids = {READY.match(p.ready_lines[0]).group(2) for p in attackers}
    for i in range(honest_count):
        events.append(metrics_events(out / f"peer{i}"))
        states += [e for e in events[-1] if e.get("event") == "state"]
        for event in events[-1]:  # what the honest peers measured of the attackers' uploads
            for peer, mbit in (event.get("uploads_mbit") or {}).items():
                if peer in attacker_ids:
                    measured[peer] = max(measured.get(peer, 0.0), mbit)
    # the shards each peer owned when the first honest one finished (later, as peers leave, the last
    # ones left own everything)
    first_done = min((max((e["time"] for e in peer_events if e.get("event") == "round"), default=math.inf)
                      for peer_events in events), default=math.inf)

    def owned_then(peer_events: list[dict]) -> int | None:
        return next((len(e["owned"]) for e in reversed(peer_events)
                     if e.get("event") == "shards" and e["time"] <= first_done), None)

    owned = [owned_then(peer_events) for peer_events in events]
    attackers_owned = [owned_then(metrics_events(out / f"attacker{j}")) for j in range(len(attackers))]
    return {"summaries": summaries, "states": states, "logs": [p.log_path for p in honest],
            "honest_shards_owned": [n for n in owned if n is not None],
            "attackers_shards_owned": [n for n in attackers_owned if n is not None],
            "attacker_upload_measured_mbit": round(max(measured.values()), 1) if measured else None}


def report(attack: str, run: dict, clean_loss: float | None) -> dict:
    summaries = run["summaries"]
    finished = [s for s in summaries if "val_loss" in s]
    losses = [s["val_loss"] for s in finished]
    val_loss = statistics.mean(losses) if losses else None
    foreign = any(s.get("round", 0) >= FORGED_ROUND for s in summaries) or \
        any(e.get("round", 0) >= FORGED_ROUND for e in run["states"])
    return {"attack": attack,
            "honest_crashed": sum(1 for s in summaries if "crashed" in s),
            "crash_reasons": [s["crashed"] for s in summaries if "crashed" in s],
            "rounds_failed": max((s.get("rounds_failed", 0) for s in finished), default=None),
            "rounds_averaged": min((s.get("rounds_averaged", 0) for s in finished), default=None),
            "val_loss": round(val_loss, 4) if val_loss is not None else None,
            "clean_val_loss": round(clean_loss, 4) if clean_loss is not None else None,
            "loss_ratio": round(val_loss / clean_loss, 4) if val_loss and clean_loss else None,
            "weights_spread": round(max(losses) - min(losses), 6) if losses else None,
            # sharded runs: the shard replicas each peer owned in its own view as the first honest one
            # finished (views differ while bids are missing from reads)
            **({"honest_shards_owned": run["honest_shards_owned"],
                "attackers_shards_owned": run["attackers_shards_owned"],
                "shard_replicas": RunConfig().shards * RunConfig().replicas} if run["honest_shards_owned"] else {}),
            "adopted_foreign_state": foreign,
            # the most an honest peer measured of an attacker's upload (what bounds its shard bid)
            "attacker_upload_measured_mbit": run["attacker_upload_measured_mbit"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--malicious", type=int, default=1)
    parser.add_argument("--attack", action="append", choices=sorted(ATTACKS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--round-timeout", type=float, default=30.0)
    parser.add_argument("--sharded", action="store_true", help="sharded outer momentum (and the bid-inflate attack)")
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny",
                        help="the GPT trained (a member's contribution to an owner is measured from 256 KiB on: "
                             "with 8 peers, mini's are 340 KB and tiny's 100 KB)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take")
    parser.add_argument("--link-mbit", type=float, default=0.0,
                        help="run every peer on its own host (network namespaces, root) behind an access link of "
                             "this many Mbit/s each way, instead of all on 127.0.0.1")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, metrics)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 0 < args.malicious < args.peers - 1:
        parser.error("--malicious must leave at least two honest peers")
    attacks = args.attack or [a for a in ATTACKS if a != "bid-inflate" or args.sharded]
    work = Path(tempfile.mkdtemp(prefix="legion-attack-"))
    try:
        clean = swarm(args, work, None)
        clean_report = report("none", clean, None)
        clean_loss = clean_report["val_loss"]
        results = [clean_report] + [report(a, swarm(args, work, a), clean_loss) for a in attacks]
    except PeerProcessError as exc:
        print(f"attack benchmark: a peer did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work directory: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
    else:
        for result in results:
            print_result(result, False)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
