"""A swarm as its DHT shows it, read again and again: the dashboard's data.

``SwarmView.watch`` reads what peers publish (members, the run board, checkpoint holdings, shard
bids) every few seconds and keeps what the board said round by round, so the loss curves grow as
rounds end. Everything it holds came from the network: it keeps bounded amounts of it (runs,
rounds, groups, versions), and turns every number into a finite one or ``None``.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import OrderedDict
from typing import Any

import trio

from bootstrap.advert import find_holdings, holdings_place
from dht import RecordDHT
from swarm.members import member_place, seeds_first
from swarm.run_board import Progress, board_place, read_run_configs
from swarm.run_config import RunConfig
from swarm.shard_ownership import fetch_shard_status

log = logging.getLogger(__name__)

MAX_RUNS = 8  # runs followed (the ones most peers train)
MAX_ROUNDS = 2000  # rounds of history kept per run
MAX_THROUGHPUT_POINTS = 600  # samples of the swarm's tokens/s kept per run
MAX_GROUPS = 24  # recent groups shown
MAX_VERSIONS = 12  # checkpoint versions shown


def finite(value: Any) -> float | None:
    """A number fit for JSON, or None (NaN and infinities are not JSON)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class SwarmView:
    """The latest ``snapshot`` of a swarm (a JSON-ready dict); ``version`` counts the reads."""

    def __init__(self, dht: RecordDHT, swarm: str, *, interval: float = 2.0, timeout: float = 10.0) -> None:
        self.dht, self.swarm, self.interval, self.timeout = dht, swarm, interval, timeout
        self.version = 0
        self.snapshot: dict[str, Any] = self._empty()
        self._updated = trio.Event()
        # run -> round -> peer -> (train loss, validation loss), the rounds in the order seen
        self._rounds: dict[str, OrderedDict[int, dict[str, tuple[float | None, float | None]]]] = {}
        self._throughput: dict[str, list[list[float]]] = {}  # run -> [[unix time, tokens/s summed], ...]
        self._groups: OrderedDict[tuple[str, str], list[str]] = OrderedDict()  # (run, round key) -> members
        # a large swarm's keys are read one bucket at a time, as a peer reads them: the view reads as one id
        reader = secrets.token_hex(16)
        self._members, self._board = member_place(swarm, reader), board_place(swarm, reader)
        self._holdings = holdings_place(swarm, reader)

    def _empty(self) -> dict[str, Any]:
        return {"swarm": self.swarm, "version": 0, "updated": None, "peers": [], "board_estimate": 0,
                "board_sampled": False, "runs": [], "groups": [],
                "shards": [], "checkpoints": []}

    async def watch(self) -> None:
        """Read the swarm every ``interval`` seconds, forever; a read that fails keeps the last view."""
        while True:
            with trio.move_on_after(self.timeout * 3):
                try:
                    await self.refresh()
                except Exception as exc:  # a bad answer or a lost connection: try again next time
                    log.info("reading swarm %r failed: %s: %s", self.swarm, type(exc).__name__, exc)
            await trio.sleep(self.interval)

    async def next_snapshot(self, after: int, timeout: float) -> dict[str, Any] | None:
        """The snapshot once it is newer than version ``after``; None if none comes within ``timeout``."""
        with trio.move_on_after(timeout):
            while self.version <= after:
                await self._updated.wait()
            return self.snapshot
        return None

    async def refresh(self) -> None:
        members = seeds_first((await self._members.read(self.dht)).entries)
        read = await self._board.read(self.dht)
        board = read.entries
        holdings = await find_holdings(self.dht, self._holdings)
        runs = self._runs_followed(board)
        board = [p for p in board if p.run_id in runs]
        configs = {run_id: config for run_id, config in (await read_run_configs(self.dht, self.swarm)).items()
                   if run_id in runs}
        shards = await fetch_shard_status(self.dht, self.swarm, configs, sharded_only=True)
        now = time.time()
        self._record(board, now)
        by_peer = {p.peer_id: p for p in board}
        peers = []
        for member in members:
            peer = member.as_json(now)
            progress = by_peer.get(member.peer_id)
            if progress is not None:
                peer.update(run_id=progress.run_id, round=progress.round, training=progress.training,
                            loss=finite(progress.loss), val_loss=finite(progress.val_loss),
                            tokens_per_second=finite(progress.tokens_per_second),
                            rounds_averaged=progress.rounds_averaged, rounds_failed=progress.rounds_failed)
            for key in ("upload_mbps", "download_mbps", "started_at"):
                peer[key] = finite(peer[key])
            peers.append(peer)
        self.version += 1
        self.snapshot = {
            "swarm": self.swarm, "version": self.version, "updated": now, "peers": peers,
            "board_estimate": read.estimate, "board_sampled": read.level > 0,
            "runs": [self._run_summary(run_id, [p for p in board if p.run_id == run_id], configs.get(run_id))
                     for run_id in runs],
            "groups": [{"run_id": run, "key": key, "members": members}
                       for (run, key), members in reversed(self._groups.items())],
            "shards": shards, "checkpoints": self._versions(holdings, runs)}
        self._updated.set()
        self._updated = trio.Event()

    @staticmethod
    def _runs_followed(board: list[Progress]) -> list[str]:
        counts: dict[str, int] = {}
        for progress in board:
            counts[progress.run_id] = counts.get(progress.run_id, 0) + 1
        return sorted(counts, key=lambda r: (-counts[r], r))[:MAX_RUNS]

    def _record(self, board: list[Progress], now: float) -> None:
        for run_id in {p.run_id for p in board}:
            rounds = self._rounds.setdefault(run_id, OrderedDict())
            peers = [p for p in board if p.run_id == run_id and p.training]
            for progress in peers:
                if finite(progress.loss) is not None:
                    rounds.setdefault(progress.round, {})[progress.peer_id] = (
                        finite(progress.loss), finite(progress.val_loss))
            while len(rounds) > MAX_ROUNDS:
                rounds.popitem(last=False)
            throughput = self._throughput.setdefault(run_id, [])
            throughput.append([now, sum(finite(p.tokens_per_second) or 0.0 for p in peers)])
            del throughput[:-MAX_THROUGHPUT_POINTS]
            for progress in board:
                if progress.run_id == run_id and progress.group_key and progress.group:
                    self._groups[(run_id, progress.group_key)] = progress.group
                    self._groups.move_to_end((run_id, progress.group_key))
        stale = [r for r in self._rounds if r not in {p.run_id for p in board}]
        for run_id in stale[:max(0, len(self._rounds) - MAX_RUNS)]:
            del self._rounds[run_id], self._throughput[run_id]
        while len(self._groups) > MAX_GROUPS:
            self._groups.popitem(last=False)

    def _run_summary(self, run_id: str, board: list[Progress], config: RunConfig | None) -> dict[str, Any]:
        def mean(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return sum(known) / len(known) if known else None

        curve = [{"round": round_, "loss": mean([v[0] for v in by_peer.values()]),
                  "val_loss": mean([v[1] for v in by_peer.values()]), "peers": len(by_peer)}
                 for round_, by_peer in sorted(self._rounds.get(run_id, {}).items())]
        training = [p for p in board if p.training]
        return {
            "run_id": run_id, "config": config.to_dict() if config else {}, "peers": len(board), "training": len(training),
            "round": max((p.round for p in board), default=0),
            "tokens_per_second": sum(finite(p.tokens_per_second) or 0.0 for p in training),
            "bytes_sent": sum(p.bytes_sent for p in board), "bytes_received": sum(p.bytes_received for p in board),
            "rounds_averaged": sum(p.rounds_averaged for p in board), "rounds_alone": sum(p.rounds_alone for p in board),
            "rounds_failed": sum(p.rounds_failed for p in board), "curve": curve,
            "throughput": self._throughput.get(run_id, [])}

    @staticmethod
    def _versions(holdings: list, runs: list[str]) -> list[dict[str, Any]]:
        versions: dict[tuple[str, bytes], dict[str, Any]] = {}
        for holding in holdings:
            if holding.run_id not in runs:
                continue
            version = versions.setdefault((holding.run_id, holding.manifest_id), {
                "run_id": holding.run_id, "manifest_id": holding.manifest_id.hex(), "round": holding.round,
                "chunks": holding.total, "holders": []})
            version["holders"].append({"peer_id": holding.peer_id, "held": holding.held, "total": holding.total})
        return sorted(versions.values(), key=lambda v: -v["round"])[:MAX_VERSIONS]
