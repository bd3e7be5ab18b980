"""Scale simulator: matchmaking at N peers whose views of the DHT differ, and the load Legion's
DHT keys put on the nodes holding them (``dht_load.py``).

    python bench/scale.py [--peers 100 1000 10000] [--miss 0.001 0.01] [--rounds 3]
                          [--churn 0.2] [--beats 12] [--only matchmaking|dht] [--json]

Every peer reads the matchmaking entries of a round from the DHT; at scale no two peers read
exactly the same set (entries still propagating, a replica that missed a store, a bundle over its
cap). Each peer here sees every other entry of its key except a random fraction ``--miss``, and
runs the real split (``averaging.groups``) on what it sees. The invitation protocol is then played
out as ``averaging.matchmaking`` does it: a peer that computes itself the leader of a group invites
the members it computed; a member accepts only the leader it computed itself. A peer is grouped on
the first try when its leader leads and invites it.

Two protocols side by side:

- ``flat`` (before 2026-12-04): one key per round holding every peer; the split's salt held the
  number of names seen, so views that differ by one entry salt differently.
- ``buckets`` (now): the salt is the key alone; from twice the target size on, peers seek in
  ``bucket_count`` buckets, each its own key, chosen by a hash of their id and the round. The
  swarm size each peer buckets by is its own estimate (the run board, missing entries alike).

Reports per protocol and N: the fraction grouped on the first try, group sizes, the largest key's
entries (what each reader of it fetches, every 0.3 s while it waits) and the CPU seconds of one
peer's split (its work per round).

Then the DHT's load (``dht_load.simulate``, per protocol, N and churn): the busiest node's
Mbit/s up and down and share of a core, the median node's, each peer's own background traffic,
the largest key, and how well a peer's bucket estimates N. Not modelled: links (RTT, loss),
shard bids and assignment, catch-up downloads.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # for report.py, after the packages

from averaging.groups import Coordinates, bucket_count, bucket_of, form_groups, plan_groups  # noqa: E402
from dht_load import calibrate, measure_messages, microseconds, simulate as simulate_dht  # noqa: E402
from report import print_result  # noqa: E402

TARGET, MIN_SIZE, MIX_EVERY = 16, 2, 4  # the reducer's group size cap, the matchmaker's defaults
REGIONS = [(0.0, 0.0), (90.0, 0.0), (0.0, 150.0), (160.0, 120.0)]  # Vivaldi positions (ms) of four regions


class Round:
    """One matchmaking round of ``peers``: who sees what, and each peer's computed group."""

    def __init__(self, protocol: str, peers: list[str], coords: dict[str, Coordinates], miss: float,
                 key: str, seed: int) -> None:
        self.protocol, self.peers, self.coords, self.miss, self.key, self.seed = protocol, peers, coords, miss, key, seed
        self.plan_seconds: list[float] = []
        self._keys: dict[str, str] = {}
        self._members: dict[str, list[str]] = {}  # key -> peers declared under it
        self._groups: dict[str, list[str]] = {}  # peer -> the group it computed for itself
        for peer in peers:
            self._members.setdefault(self.key_of(peer), []).append(peer)

    def _sees(self, peer: str) -> random.Random:
        return random.Random(hashlib.sha256(f"{self.seed}/{self.key}/{peer}".encode()).digest())

    def key_of(self, peer: str) -> str:
        if peer not in self._keys:
            key = self.key
            if self.protocol == "buckets":
                rng = self._sees(peer + "/board")
                estimate = sum(1 for p in self.peers if p == peer or rng.random() >= self.miss)
                count = bucket_count(estimate, min(TARGET, estimate))
                key = key if count == 1 else f"{key}/{count}.{bucket_of(peer, key, count)}"
            self._keys[peer] = key
        return self._keys[peer]

    def group_of(self, peer: str) -> list[str]:
        if peer not in self._groups:
            key = self.key_of(peer)
            rng = self._sees(peer)
            view = sorted(p for p in self._members[key] if p == peer or rng.random() >= self.miss)
            target = min(TARGET, len(self.peers))

            def distance(a: str, b: str) -> float:
                return self.coords[a].distance(self.coords[b])

            started = time.perf_counter()
            if self.protocol == "flat":
                salt = f"{key}/0/{len(view)}"  # the old salt: the names seen counted in
                mix = int(hashlib.sha256(salt.encode()).hexdigest(), 16) % MIX_EVERY == 0
                groups = form_groups(view, distance, target, MIN_SIZE, salt, mix)
            else:
                groups = plan_groups(view, distance, target, MIN_SIZE, key, MIX_EVERY)
            self.plan_seconds.append(time.perf_counter() - started)
            self._groups[peer] = next(g for g in groups if peer in g)
        return self._groups[peer]

    def leader_of(self, peer: str) -> str:
        return self.group_of(peer)[0]  # groups are sorted: the smallest id leads

    def grouped(self, peer: str) -> bool:
        """Whether ``peer``'s leader leads and invites it (then it accepts: it is the leader the
        peer computed). A peer alone in its computed group is not grouped."""
        leader = self.leader_of(peer)
        if leader == peer:
            return any(self.leader_of(m) == peer for m in self.group_of(peer) if m != peer)
        return self.leader_of(leader) == leader and peer in self.group_of(leader)

    def formed_size(self, leader: str) -> int:
        return 1 + sum(1 for m in self.group_of(leader) if m != leader and self.leader_of(m) == leader)


def place(peers: list[str], rng: random.Random) -> dict[str, Coordinates]:
    coords = {}
    for peer in peers:
        x, y = rng.choice(REGIONS)
        coords[peer] = Coordinates(x + rng.gauss(0, 10), y + rng.gauss(0, 10), rng.uniform(5, 30))
    return coords


def simulate(protocol: str, n: int, miss: float, rounds: int, sample: int, seed: int) -> dict:
    rng = random.Random(seed)
    peers = [hashlib.sha256(f"peer{seed}/{i}".encode()).hexdigest()[:20] for i in range(n)]
    coords = place(peers, rng)
    grouped, sizes, plan_seconds, key_entries = [], [], [], 0
    started = time.monotonic()
    for r in range(rounds):
        round_ = Round(protocol, peers, coords, miss, f"/legion/sim/mm/run/diloco-{r}", seed)
        checked = peers if sample >= n else rng.sample(peers, sample)
        grouped += [round_.grouped(p) for p in checked]
        leaders = {round_.leader_of(p) for p in checked}
        sizes += [round_.formed_size(leader) for leader in leaders if round_.leader_of(leader) == leader]
        plan_seconds += round_.plan_seconds
        key_entries = max(key_entries, max(len(m) for m in round_._members.values()))
    return {"protocol": protocol, "peers": n, "miss": miss, "rounds": rounds, "peers_checked": len(grouped),
            "grouped_first_try": round(sum(grouped) / len(grouped), 4),
            "group_size_median": statistics.median(sizes) if sizes else 0,
            "group_size_min": min(sizes, default=0), "largest_key_entries": key_entries,
            "split_cpu_ms_median": round(1000 * statistics.median(plan_seconds), 2),
            "sim_seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--miss", type=float, nargs="+", default=[0.001, 0.01],
                        help="fraction of the other entries of its key each peer does not see")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample", type=int, default=300,
                        help="peers checked per round (their leaders' and members' splits are computed too)")
    parser.add_argument("--flat-max", type=int, default=1000,
                        help="largest N to run the flat protocol at (each split is O(N^2 / target))")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--churn", type=float, default=0.2, help="joins (and leaves) per peer per hour")
    parser.add_argument("--beats", type=int, default=12,
                        help="heartbeats measured in the DHT simulation (a minute: whole refresh periods and a round)")
    parser.add_argument("--only", choices=["matchmaking", "dht"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result: dict = {}
    if args.only != "dht":
        result["matchmaking"] = []
        for n in args.peers:
            for miss in args.miss:
                for protocol in ("flat", "buckets"):
                    if protocol == "flat" and n > args.flat_max:
                        continue
                    result["matchmaking"].append(simulate(protocol, n, miss, args.rounds, args.sample, args.seed))
                    if not args.json:
                        print(result["matchmaking"][-1], flush=True)
    if args.only != "matchmaking":
        costs = calibrate()
        messages = {"py-libp2p": measure_messages(lean=False), "legion": measure_messages(lean=True)}
        result["dht_costs_microseconds"], result["dht"] = microseconds(costs), []
        result["dht_message_bytes"] = {name: vars(measured) for name, measured in messages.items()}
        for n in args.peers:
            for protocol in ("flat", "buckets"):
                result["dht"].append(simulate_dht(protocol, n, args.churn, costs, messages, args.beats, args.seed))
                if not args.json:
                    print(result["dht"][-1], flush=True)
    print_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
