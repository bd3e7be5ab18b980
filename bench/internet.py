"""Internet benchmark: a training swarm across public hosts and home NATs, in network namespaces.

    python bench/internet.py [--rounds 8] [--group-size G] [--sharded] [--down 50] [--up 15] [--json]

Topology (``tests/netns_helpers.Lab``, its own namespaces on a public-looking "internet",
11.201.0.0/24; needs root, iproute2, iptables, nftables and miniupnpd): ``pub1`` (the seed, which
relays) and ``pub2`` on the internet; ``home1`` and ``home2`` each behind a home router that
masquerades keeping source ports (hole punching can work); ``home3`` behind one that picks a random
port per connection, as symmetric NATs do (hole punching fails); ``home4`` behind a home router
behind a carrier-grade NAT (100.64.0.0/10, port-random); ``home5`` behind a router with UPnP
(miniupnpd), which forwards its ports when asked. Every access link is rate-limited with ``tbf``
(``--down`` / ``--up`` Mbit/s); this kernel has no ``netem``, so no delay or loss is added. The same
seven peers then train again with every host public, for the all-reduce time ratio.

Reports per peer: reachability (as ``status`` showed it), rounds averaged of rounds run, and how it
reached the peers it dialled through a relay (``relayed``, or ``hole punched`` once a direct
connection followed); the median all-reduce seconds against the all-public run; the bytes each
peer's relay service carried for others' circuits (``relayed_bytes``, from its summary; the total at
the top level), against the relay's limit per circuit (``--relay-limits``, 64 MiB by default).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for report.py, after the packages

from report import print_result  # noqa: E402
from swarm.local import training_summary  # noqa: E402
from tests.netns_helpers import Lab  # noqa: E402

HOMES = {"home1": {}, "home2": {}, "home3": {"random_ports": True}, "home4": {"cgnat": True},
         "home5": {"upnp": True}}  # name -> its router (``Lab.add_home``)
INTERNET = "11.201.0"  # public-looking: miniupnpd forwards nothing on a private WAN address
PUBLIC = ("pub1", "pub2")
RELAYED = re.compile(r"connected to (\S+) through a relay")
PUNCHED = re.compile(r"direct connection to (\S+) \(hole punched\)")


def run(args: argparse.Namespace, work: Path, all_public: bool) -> dict:
    lab = Lab(INTERNET)
    try:
        names = [*PUBLIC, *HOMES]
        for index, name in enumerate(names, 1):
            if all_public or name in PUBLIC:
                lab.add_host(name, index)
            else:
                lab.add_home(name, index, **HOMES[name])
            lab.shape(name, args.down, args.up)
        common = ["--threads", "1", "--heartbeat", "2", "--wait-peers", str(len(names))]
        train = ["--model", "tiny", "--inner-steps", str(args.inner_steps), "--batch-size", "8",
                 "--rounds", str(args.rounds), *(["--group-size", str(args.group_size)] if args.group_size else []),
                 *(["--sharded"] if args.sharded else [])]
        logs = work / "logs"
        seed = lab.start_peer("pub1", ["--seed", *train, *common, "--out", str(work / "pub1")], logs)
        processes = {"pub1": seed}
        for name in names[1:]:
            processes[name] = lab.start_peer(name, ["--bootstrap", seed.addrs[0], *common, "--out", str(work / name)], logs)
        ids = {name: process.peer_ids[0] for name, process in processes.items()}
        deadline = time.monotonic() + 90
        while True:  # until every peer knows how others reach it (homes: relayed once they hold a slot)
            shown = {p["peer_id"]: p["reachability"] for p in lab.status("pub1", seed.addrs[0])}
            reach = {name: shown.get(peer_id, "absent") for name, peer_id in ids.items()}
            if all(r in ("public", "relayed") for r in reach.values()) or time.monotonic() > deadline:
                break
            time.sleep(3)
        summaries = {}
        for name, process in processes.items():
            try:
                summaries[name] = training_summary(process, args.timeout)
            except Exception as exc:  # a peer that trained alone exits 3: still reported
                summaries[name] = {"error": str(exc).splitlines()[0]}
        by_id = {peer_id: name for name, peer_id in ids.items()}
        peers, seconds = {}, []
        for name, process in processes.items():
            log = process.log_path.read_text(errors="replace")
            paths = {by_id.get(p, p[:12]): "relayed" for p in RELAYED.findall(log)}
            paths.update({by_id.get(p, p[:12]): "hole punched" for p in PUNCHED.findall(log)})
            metrics = work / name / "metrics.jsonl"
            events = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
            seconds += [e["seconds"] for e in events if e.get("event") == "reduced" and e["outcome"] == "averaged"]
            summary = summaries[name]
            peers[name] = {"reachability": reach.get(name), "rounds_averaged": summary.get("rounds_averaged"),
                           "rounds": summary.get("round"), "paths": paths, "traceback": "Traceback" in log,
                           "relayed_bytes": summary.get("relayed_bytes"),
                           **({"error": summary["error"]} if "error" in summary else {})}
        return {"peers": peers, "allreduce_seconds": statistics.median(seconds) if seconds else None}
    finally:
        lab.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--group-size", type=int, help="the run's group_size (below 7: two-level rounds)")
    parser.add_argument("--sharded", action="store_true", help="sharded outer momentum (the run's shards' owners step)")
    parser.add_argument("--down", type=float, default=50.0, help="download Mbit/s of every access link")
    parser.add_argument("--up", type=float, default=15.0, help="upload Mbit/s of every access link")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a peer may take to finish")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the peers' logs and metrics in DIR")
    parser.add_argument("--no-public", action="store_true", help="skip the all-public run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="legion-internet-") as tmp:
        work = args.keep or Path(tmp)
        mixed = run(args, work / "mixed", all_public=False)
        public = {"allreduce_seconds": None} if args.no_public else run(args, work / "public", all_public=True)
    ratio = None
    if mixed["allreduce_seconds"] and public["allreduce_seconds"]:
        ratio = round(mixed["allreduce_seconds"] / public["allreduce_seconds"], 3)
    relayed = sum(p["relayed_bytes"] or 0 for p in mixed["peers"].values())
    result = {"peers": mixed["peers"], "relayed_bytes": relayed, "allreduce_seconds": mixed["allreduce_seconds"],
              "allreduce_seconds_all_public": public["allreduce_seconds"], "allreduce_vs_public": ratio,
              # a peer that trained alone exits 3 without a summary: it counts as args.rounds run, none averaged
              "rounds_averaged_fraction": round(sum(p["rounds_averaged"] or 0 for p in mixed["peers"].values())
                                                / (args.rounds * len(mixed["peers"])), 3)}
    print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
