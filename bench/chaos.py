"""Chaos benchmark: a training swarm under sustained churn and network faults.

    python bench/chaos.py --peers 8 --rounds 40 --churn 0.2 [--partition] [--kinds K ...] [--sharded] [--group-size G] [--json]

N peer processes, each on its own host (a network namespace on one bridge, ``tests/netns_helpers``)
with its own identity and checkpoint directory, train the tiny GPT with DiLoCo. On a seeded random
schedule the controller faults ``churn`` x N peers per 10 rounds, with kinds drawn from:

- ``restart``: ``kill -9``, down 1-4 s, restarted with the same identity and disk;
- ``restart-truncated``: the same, with a checkpoint chunk on its disk cut in half while it is down;
- ``restart-while-joining``: restarted, killed again 1-3 s later while it loads its disk and fetches
  the swarm's state, then restarted once more;
- ``replace``: ``kill -9`` for good; a fresh peer (new identity, empty disk) joins on that host;
- ``stop``: SIGSTOP for longer than the round deadline, then SIGCONT;
- ``cut``: every packet to and from the peer's host dropped for a while;
- ``partition`` (with ``--partition``): the swarm split into two halves for a while.

Faults strike at random moments (``--aim random``) or the moment the first peer has finished a
round's all-reduce, while the others are still exchanging theirs (``--aim averaging``).

Oracles, checked as the peers' ``metrics.jsonl`` lines arrive (``reduced``: a round's outcome and
contributors; ``applied``: the swarm weights' digest after each round):

- every peer that applied the same group's average of a round holds bit-identical swarm weights;
- the members of a group that report its round averaged report the same contributor set;
- some round averages somewhere at least every ``--watchdog`` seconds;
- no peer prints a traceback, and every live peer exits within its deadline once the run is done;
- a restarted or replacing peer averages with the swarm again (its rejoin time is reported), or,
  restarted as the others finished, ends with the final weights they settled on;
- with ``--sharded``, no momentum is lost (the survivors' ``momentum_lost``).

Then the same run without faults gives ``clean_val_loss`` (skip it with ``--no-clean``). Needs root,
iproute2 and iptables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for report.py, after the packages

from report import print_result  # noqa: E402
from run_file import run_file  # noqa: E402
from swarm.local import PeerProcess, PeerProcessError  # noqa: E402
from tests.netns_helpers import Lab  # noqa: E402

PORT, LANE_PORT = 4001, 4002
KINDS = ("restart", "restart-truncated", "restart-while-joining", "replace", "stop", "cut")
RESTARTS = ("restart", "restart-truncated", "restart-while-joining", "replace")
REJOIN_GRACE = 45.0


@dataclass
class Slot:
    """A host and the peer on it (a new process after each restart, a new identity and disk
    after each replacement)."""

    index: int
    host: str
    ip: str
    work: Path
    replaced: int = 0  # a new identity and disk after each replacement
    process: PeerProcess | None = None
    peer_id: str = ""
    started_at: float = 0.0
    stopped: bool = False

    @property
    def identity(self) -> Path:
        return self.work / f"id{self.index}-{self.replaced}.key"

    @property
    def out(self) -> Path:
        return self.work / f"peer{self.index}-{self.replaced}"

    @property
    def address(self) -> str:
        return f"/ip4/{self.ip}/tcp/{PORT}/p2p/{self.peer_id}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None


@dataclass
class Fault:
    kind: str
    slots: list[int]
    at: float
    round: int
    heal_at: float | None = None
    restarted_at: float | None = None  # a killed peer's new process started
    rekill_at: float | None = None  # restart-while-joining: when the restarted peer is killed again
    at_rekill: bool = False  # ... which happens once
    recovered_at: float | None = None  # the swarm's next averaged round
    rejoined_at: float | None = None  # a restarted or replacing peer's first averaged round
    after_end: bool = False  # due when peers had finished the run: no restart (nobody left to join)


@dataclass
class Oracles:
    """What the peers' metrics lines must satisfy, checked as they arrive."""

    digests: dict[tuple[int, tuple[str, ...]], str] = field(default_factory=dict)
    contributors: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group id -> its contributor set
    violations: list[str] = field(default_factory=list)
    last_averaged: float = 0.0
    failed: Counter = field(default_factory=Counter)  # reason -> rounds
    checked: int = 0

    def applied(self, peer: str, event: dict) -> None:
        if not event["members"]:
            return
        key = (event["round"], tuple(event["members"]))
        self.checked += 1
        known = self.digests.setdefault(key, event["digest"])
        if known != event["digest"]:
            self.violations.append(f"round {key[0]}: {peer[-6:]} holds weights {event['digest'][:8]}, "
                                   f"another member of its group {known[:8]}")

    def reduced(self, peer: str, event: dict, now: float) -> None:
        if event["outcome"] == "failed":
            self.failed[_reason(event.get("reason", ""))] += 1
            return
        if event["outcome"] != "averaged":
            return
        self.last_averaged = now
        # keyed by group, not round: a peer that adopts the swarm's state while its own group
        # still averages that round finishes the group (its result dropped), then averages the
        # round again with the swarm, in another group
        contributors = tuple(event["members"])
        known = self.contributors.setdefault(event["group"], contributors)
        if known != contributors:
            round_ = int(event["key"].rsplit("-", 1)[-1])
            self.violations.append(f"round {round_}: {peer[-6:]} averaged over {len(contributors)} contributors, "
                                   f"another member of its group over a different set of {len(known)}")


def _reason(text: str) -> str:
    """A failure reason without its peer ids and numbers, so that alike reasons count together."""
    text = re.sub(r"12D3Koo\w+", "PEER", re.sub(r"\b[0-9a-f]{16}\b", "RUN", text))
    return re.sub(r"\d+(\.\d+)?", "N", text)[:120]


class ChaosSwarm:
    """The peers of one run on their hosts, the faults, and the oracles over their metrics."""

    def __init__(self, lab: Lab, work: Path, peers: int, run_file: Path, *, heartbeat: float = 2.0,
                 seed: int = 0) -> None:
        self.lab, self.work, self.run_file, self.heartbeat = lab, work, run_file, heartbeat
        self.rng = random.Random(seed)
        self.slots = [Slot(i, f"c{i}", lab.add_host(f"c{i}", 10 + i), work) for i in range(peers)]
        for slot in self.slots:
            self._iptables(slot, "-N", "CHAOS")
            self._iptables(slot, "-I", "INPUT", "-j", "CHAOS")
            self._iptables(slot, "-I", "OUTPUT", "-j", "CHAOS")
        self.oracles = Oracles()
        self.faults: list[Fault] = []
        self.summaries: list[dict] = []  # ``done`` lines of the peers that finished
        self.tracebacks: list[str] = []
        self.hung: list[str] = []
        self._offsets: dict[Path, int] = {}
        self._peer_of: dict[Path, str] = {}
        self.lineage_moves: Counter = Counter()  # adopted (True) or not: peers taking another lineage's state mid-run
        self._gone: list[PeerProcess] = []  # killed processes, whose logs are still checked
        self.swarm_round = 0
        self.run_ended = False  # some peer finished its last round
        self.run_ended_at: float | None = None

    # ----- peers
    def start(self) -> None:
        first = self.slots[0]
        self._launch(first, ["--seed", "--run", str(self.run_file), "--wait-peers", str(len(self.slots))])
        for slot in self.slots[1:]:
            self._launch(slot, ["--bootstrap", first.address, "--wait-peers", str(len(self.slots))])

    def _launch(self, slot: Slot, role: list[str]) -> None:
        args = [*role, "--listen", f"/ip4/0.0.0.0/tcp/{PORT}", "--lane-port", str(LANE_PORT),
                "--identity", str(slot.identity), "--out", str(slot.out), "--heartbeat", str(self.heartbeat),
                "--threads", "1"]
        slot.process = self.lab.start_peer(slot.host, args, self.work / "logs", timeout=90)
        slot.peer_id, slot.started_at, slot.stopped = slot.process.peer_ids[0], time.monotonic(), False
        self._peer_of[slot.out / "metrics.jsonl"] = slot.peer_id

    def _bootstrap(self, slot: Slot) -> list[str]:
        others = [s for s in self.slots if s is not slot and s.alive and not s.stopped]
        self.rng.shuffle(others)
        return [arg for other in others[:3] for arg in ("--bootstrap", other.address)]

    def _kill(self, slot: Slot) -> None:
        if slot.stopped:
            os.kill(slot.process.pid, signal.SIGCONT)
        slot.process.kill()
        self._gone.append(slot.process)

    def _restart(self, slot: Slot, truncate: bool) -> None:
        if truncate:
            chunks = sorted((slot.out / "checkpoints" / "chunks").glob("*"))
            if chunks:
                victim = self.rng.choice(chunks)
                with victim.open("r+b") as f:
                    f.truncate(victim.stat().st_size // 2)
        self._launch(slot, [*self._bootstrap(slot), "--run", str(self.run_file)] if slot.index == 0
                     else self._bootstrap(slot))

    # ----- faults
    def inject(self, kind: str, stop_seconds: float, network_seconds: float) -> Fault:
        now = time.monotonic()
        live = [s for s in self.slots if s.alive and not s.stopped]
        if kind == "partition":
            half = self.rng.sample(live, len(live) // 2)
            rest = [s for s in live if s not in half]
            for group, other in ((half, rest), (rest, half)):
                for slot in group:
                    for target in other:
                        self._iptables(slot, "-A", "CHAOS", "-s", target.ip, "-j", "DROP")
                        self._iptables(slot, "-A", "CHAOS", "-d", target.ip, "-j", "DROP")
            fault = Fault(kind, [s.index for s in half], now, self.swarm_round, heal_at=now + network_seconds)
        else:
            joining = self.joining()
            slot = self.rng.choice([s for s in live if s.index not in joining])
            fault = Fault(kind, [slot.index], now, self.swarm_round)
            if kind in RESTARTS:
                self._kill(slot)
                fault.heal_at = now + self.rng.uniform(1, 4)
            elif kind == "stop":
                os.kill(slot.process.pid, signal.SIGSTOP)
                slot.stopped = True
                fault.heal_at = now + stop_seconds
            elif kind == "cut":
                self._iptables(slot, "-A", "CHAOS", "!", "-i", "lo", "-j", "DROP")
                self._iptables(slot, "-A", "CHAOS", "!", "-o", "lo", "-j", "DROP")
                fault.heal_at = now + network_seconds
        self.faults.append(fault)
        return fault

    def heal_due(self) -> None:
        now = time.monotonic()
        for fault in self.faults:
            if fault.rekill_at is not None and fault.rekill_at <= now:
                self._kill(self.slots[fault.slots[0]])
                fault.rekill_at, fault.restarted_at = None, None
                fault.heal_at = now + self.rng.uniform(1, 2)
                continue
            if fault.heal_at is None or fault.heal_at > now:
                continue
            fault.heal_at = None
            slots = [self.slots[i] for i in fault.slots]
            if fault.kind == "partition":
                slots = self.slots
            if fault.kind in RESTARTS and self.run_ended:
                fault.after_end = True  # its peers would find the others leaving, and rightly exit
                continue
            for slot in slots:
                if fault.kind in ("restart", "restart-truncated", "restart-while-joining"):
                    self._restart(slot, fault.kind == "restart-truncated")
                    if fault.kind == "restart-while-joining" and not fault.at_rekill:
                        fault.rekill_at, fault.at_rekill = now + self.rng.uniform(1, 3), True
                elif fault.kind == "replace":
                    slot.replaced += 1
                    self._launch(slot, self._bootstrap(slot))
                elif fault.kind == "stop" and slot.alive:
                    os.kill(slot.process.pid, signal.SIGCONT)
                    slot.stopped = False
                else:
                    self._iptables(slot, "-F", "CHAOS")
            if fault.kind in RESTARTS:
                fault.restarted_at = time.monotonic()

    def busy(self) -> bool:
        """Whether a fault is still in effect, or a restarted peer is still joining."""
        return self.in_effect() or bool(self.joining())

    def in_effect(self) -> bool:
        """Whether a fault is still to heal (or a restart-while-joining still to kill again)."""
        return any(f.heal_at is not None or f.rekill_at is not None for f in self.faults)

    def ready_for(self, kind: str) -> bool:
        """Whether a fault of ``kind`` may start now: no fault is in effect, and a partition also
        waits for restarted peers to join (up to ``REJOIN_GRACE`` seconds: one restarted into a
        partition would find no bootstrap peer, and rightly exit); other kinds hit a peer that is
        not joining, so faults overlap rejoins (one after another, 7 faults did not fit into 16
        rounds of 5 s)."""
        if self.in_effect():
            return False
        joining = self.joining()
        return not joining if kind == "partition" else any(
            s.alive and not s.stopped and s.index not in joining for s in self.slots)

    def joining(self) -> set[int]:
        """The slots of peers restarted less than ``REJOIN_GRACE`` seconds ago that have not yet averaged."""
        now = time.monotonic()
        return {i for f in self.faults if f.restarted_at is not None and f.rejoined_at is None
                and now - f.restarted_at < REJOIN_GRACE for i in f.slots}

    def _iptables(self, slot: Slot, *rule: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.lab.hosts[slot.host], "iptables", *rule], check=True,
                       capture_output=True)

    # ----- observing
    def observe(self) -> None:
        """Read the new metrics lines of every peer and check them."""
        now = time.monotonic()
        for path, peer in list(self._peer_of.items()):
            try:
                with path.open("rb") as f:
                    f.seek(self._offsets.get(path, 0))
                    data = f.read()
            except FileNotFoundError:
                continue
            complete = data[:data.rfind(b"\n") + 1]
            self._offsets[path] = self._offsets.get(path, 0) + len(complete)
            for line in complete.decode().splitlines():
                event = json.loads(line)
                if event["event"] == "done" and not self.run_ended:
                    self.run_ended, self.run_ended_at = True, now
                if event["event"] == "applied":
                    self.oracles.applied(peer, event)
                elif event["event"] == "lineage":  # it took (or failed to take) the state more peers hold
                    self.lineage_moves[bool(event.get("adopted"))] += 1
                elif event["event"] == "reduced":
                    self.oracles.reduced(peer, event, now)
                    self.swarm_round = max(self.swarm_round, int(event["key"].rsplit("-", 1)[-1]) + 1)
                    if event["outcome"] == "averaged":
                        self._recovered(peer, now)

    def _recovered(self, peer: str, now: float) -> None:
        for fault in self.faults:
            if fault.heal_at is None and fault.recovered_at is None:
                fault.recovered_at = now
            if fault.restarted_at is not None and fault.rejoined_at is None \
                    and any(self.slots[i].peer_id == peer for i in fault.slots):
                fault.rejoined_at = now

    def finish(self, timeout: float, aborted: bool = False) -> None:
        """Wait for every live peer to end its run; collect summaries, tracebacks and hangs (an
        ``aborted`` run's peers are still training: they are stopped, not counted as hung)."""
        deadline = time.monotonic() + (0 if aborted else timeout)
        for slot in self.slots:
            if slot.stopped:
                os.kill(slot.process.pid, signal.SIGCONT)
            self._iptables(slot, "-F", "CHAOS")
        for slot in self.slots:
            if slot.process is None:
                continue
            try:
                lines = slot.process.output_lines(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if not aborted:
                    self.hung.append(slot.peer_id)
                slot.process.kill()
                continue
            self.summaries += [json.loads(line[5:]) for line in lines if line.startswith("done ")]
        self.observe()
        for process in [*self._gone, *(s.process for s in self.slots if s.process)]:
            if "Traceback" in process.log_path.read_text(errors="replace"):
                self.tracebacks.append(str(process.log_path))


def run(args: argparse.Namespace, work: Path, faults: bool) -> dict:
    """One run, with or without faults; its figures and oracle results."""
    work.mkdir(parents=True, exist_ok=True)
    lab = Lab()
    try:
        swarm = ChaosSwarm(lab, work, args.peers, run_file(args, work), seed=args.seed)
        swarm.start()
        kinds = list(args.kinds) if args.kinds else [*KINDS, *(["partition"] if args.partition else [])]
        total = round(args.churn * args.peers * args.rounds / 10) if faults else 0
        rng = random.Random(args.seed)
        rng.shuffle(kinds)
        # faults at random rounds from round 2 until 3 rounds before the end, kinds in a shuffled cycle
        at_rounds = sorted(rng.uniform(2, max(3, args.rounds - 3)) for _ in range(total))
        schedule = [(r, kinds[i % len(kinds)]) for i, r in enumerate(at_rounds)]
        started = time.monotonic()
        swarm.oracles.last_averaged = started
        seen_round, aborted = 0, False
        while any(s.alive for s in swarm.slots):
            swarm.observe()
            swarm.heal_due()
            new_round, seen_round = swarm.swarm_round > seen_round, swarm.swarm_round
            if schedule and swarm.swarm_round >= schedule[0][0] and swarm.ready_for(schedule[0][1]) \
                    and (args.aim == "random" or new_round):
                swarm.inject(schedule.pop(0)[1], args.stop_seconds, args.network_seconds)
            if time.monotonic() - swarm.oracles.last_averaged > args.watchdog:
                swarm.oracles.violations.append(f"watchdog: no round averaged anywhere for {args.watchdog:.0f} s")
                aborted = True
                break
            if time.monotonic() - started > args.timeout:
                swarm.oracles.violations.append(f"the run did not end within {args.timeout:.0f} s")
                aborted = True
                break
            if not swarm.busy() and not schedule and all(
                    not s.alive or s.process.proc.poll() is not None for s in swarm.slots):
                break
            time.sleep(0.1)
        swarm.finish(timeout=max(30.0, 3 * args.round_timeout), aborted=aborted)
        return report(swarm, args, started)
    finally:
        lab.close()


def report(swarm: ChaosSwarm, args: argparse.Namespace, started: float) -> dict:
    survivors = swarm.summaries
    finals = {}
    for slot in swarm.slots:  # the digest of each survivor's last applied round, or of the state it adopted last
        path = slot.out / "metrics.jsonl"
        applied = [event for event in map(json.loads, path.read_text().splitlines())
                   if event["event"] in ("applied", "adopted")] if path.exists() else []
        if applied and slot.peer_id not in swarm.hung:
            finals[slot.peer_id] = (applied[-1]["round"], applied[-1]["digest"])
    last_round = max((r for r, _ in finals.values()), default=0)
    final_digests = {d for r, d in finals.values() if r == last_round}
    recovery = [f.recovered_at - f.at for f in swarm.faults if f.recovered_at is not None]
    rejoin = [f.rejoined_at - f.restarted_at for f in swarm.faults if f.restarted_at and f.rejoined_at]
    restarted = [f for f in swarm.faults if f.kind in RESTARTS and not f.after_end]
    # A peer restarted as the others finished had no round left to average in: it must end with
    # the weights they settled on (it steps its last rounds alone, then adopts those)
    agreed = Counter(d for _, d in finals.values()).most_common(1)[0][0] if finals else None
    at_the_end = [f for f in restarted if f.restarted_at and not f.rejoined_at and swarm.run_ended_at is not None
                  and swarm.run_ended_at - f.restarted_at < REJOIN_GRACE
                  and all(finals.get(swarm.slots[i].peer_id, (0, None))[1] == agreed for i in f.slots)]
    return {
        "peers": args.peers, "rounds": args.rounds, "churn": args.churn,
        "seconds": round(time.monotonic() - started, 1),
        "faults": len(swarm.faults), "fault_kinds": dict(Counter(f.kind for f in swarm.faults)),
        "fault_times": [[f.kind, f.round, round(f.at - started, 1)] for f in swarm.faults],
        "rounds_completed": max((s["round"] for s in survivors), default=0),
        "rounds_failed": sum(swarm.oracles.failed.values()), "failure_reasons": dict(swarm.oracles.failed.most_common(6)),
        "val_loss": statistics.mean(s["val_loss"] for s in survivors) if survivors else None,
        "survivors": len(survivors), "survivors_same_weights": len(final_digests) == 1,
        "max_recovery_seconds": round(max(recovery), 1) if recovery else None,
        "recovery_seconds": [round(r, 1) for r in recovery],
        "rejoin_seconds": [round(r, 1) for r in rejoin], "not_rejoined": len(restarted) - len(rejoin) - len(at_the_end),
        "restarted_as_the_run_ended": len(at_the_end),
        "not_restarted_after_the_end": sum(f.after_end for f in swarm.faults),
        "bytes_refetched": sum(s.get("checkpoint_bytes_fetched", 0) for s in survivors),
        "momentum_lost": sum(s.get("momentum_lost", 0) for s in survivors),
        "lineage_moves": swarm.lineage_moves[True], "lineage_moves_failed": swarm.lineage_moves[False],
        "groups_checked": swarm.oracles.checked,
        "identical_after_every_round": not any("holds weights" in v for v in swarm.oracles.violations),
        "violations": swarm.oracles.violations[:20], "tracebacks": swarm.tracebacks, "hung": swarm.hung,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--churn", type=float, default=0.2, help="fraction of peers faulted per 10 rounds")
    p.add_argument("--partition", action="store_true", help="also split the swarm in two halves")
    p.add_argument("--kinds", nargs="+", choices=(*KINDS, "partition"),
                   help="draw faults of these kinds only (instead of all, the partition with --partition)")
    p.add_argument("--sharded", action="store_true", help="sharded outer momentum (2 replicas)")
    p.add_argument("--group-size", type=int, default=None,
                   help="peers per averaging group (fewer than --peers: rounds reduce across groups)")
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--round-timeout", type=float, default=15.0)
    p.add_argument("--stop-seconds", type=float, default=20.0, help="how long a SIGSTOP lasts")
    p.add_argument("--network-seconds", type=float, default=10.0, help="how long a cut or a partition lasts")
    p.add_argument("--watchdog", type=float, default=120.0, help="fail if no round averages for this long")
    p.add_argument("--timeout", type=float, default=1800.0, help="fail if the run takes longer")
    p.add_argument("--aim", choices=("random", "averaging"), default="random",
                   help="fault at random moments, or as the first peer finishes a round's all-reduce")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-clean", action="store_true", help="skip the fault-free run")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep the peers' logs and metrics in DIR")
    p.add_argument("--json", action="store_true")
    return p


def main() -> int:
    args = parser().parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        print("bench/chaos.py needs root, iproute2 and iptables (network namespaces)", file=sys.stderr)
        return 2
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        # the controller follows the peers' metrics files: an earlier run's would be read as this one's
        print(f"--keep {args.keep}: not empty (an earlier run's metrics would count as this run's)", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="legion-chaos-"))
    try:
        result = run(args, work / "chaos", faults=True)
        if not args.no_clean:
            clean = run(args, work / "clean", faults=False)
            result["clean_val_loss"] = clean["val_loss"]
            if result["val_loss"] and clean["val_loss"]:
                result["loss_ratio"] = round(result["val_loss"] / clean["val_loss"], 4)
    except PeerProcessError as exc:
        print(f"a peer failed to start: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_result(result, args.json)
    return 0 if not result["violations"] and not result["tracebacks"] and not result["hung"] else 1


if __name__ == "__main__":
    sys.exit(main())
