"""Training in a swarm: the composition of a peer, the run board, the data, the model, a swarm
optimizer and the state server. The torch loop runs in a worker thread; everything networked runs
on the trio side."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, Collection

import torch
import trio

from averaging.averager import Averager
from bootstrap.checkpoint_swarm import CheckpointSwarm
from bootstrap.chunk_store import ChunkError, ChunkStore
from bootstrap.manifest import ManifestError, SignedManifest
from bootstrap.swarm_download import DownloadError
from optim.base import Reduced, StateError, SwarmOptimizer, weights_digest
from optim.data import Corpus, load_corpus
from optim.diloco import ALIGN_LIMIT, DiLoCo
from optim.model import GPT
from optim.onebit_adam import OneBitAdam
from optim.schedule import lr_factor
from optim.synchronous import SyncOptimizer
from shards.assignment import Assignment
from shards.bids import Bid
from shards.outer import ShardedOuter
from dht.records import MAX_TTL
from swarm import resources
from swarm.peer import Peer
from swarm.final_weights import agreed_digest, outnumbering, settled_digest
from swarm.reducer import RoundReport, SwarmReducer
from swarm.run_board import (MAX_GROUP, RUN_CONFIG_HEARTBEATS, Progress,
                             board_place, choose_run, publishes_config, read_run_configs, run_configs_key)
from swarm.run_config import PROTOCOL, RunConfig
from swarm.shard_ownership import MeasuredUploads, bid_and_assign, own_bid, run_assignment

log = logging.getLogger(__name__)

EVAL_EVERY_STEPS = 50
MAX_DONORS_TRIED = 2  # signers of an attested state whose version a fetch tries in turn (``_fetch_from_swarm``)
BASE_DIGEST_CHARS = 12  # of a weights' digest on the board: 48 bits tell lineages apart, in 16 bytes an entry
CATCH_UP_PATIENCE_HEARTBEATS = 5  # how long a failed peer asks for a state the others are about to make
OWN_BASES_KEPT = 4  # this peer's last rounds whose weights it compares with the board's (_outnumbering)
MAX_WITNESSES = 8  # peers asked at once for their state when catching up
RELOOKUP_SECONDS = 15.0  # a peer whose catch-up found no attested state looks keys up again at most this often
CHECKPOINT_SECONDS = 30.0  # a new version on disk at most this often (and on request, and at the end)
BOARD_MEMORY_TTLS = 3  # a board entry missing from reads still counts for this many entry lifetimes
FINAL_HEARTBEATS = 4  # with a round timeout: how long peers settle on their final weights at the end
CONNECT_AHEAD_RETRY_HEARTBEATS = 4  # heartbeats before a run peer not reached ahead of its rounds is tried again
# Behind NAT, a peer connects ahead to the run's other peers while they are fewer than this (or than
# a group): a round's groups then form among peers already connected. Connected only once its group
# formed, a member's first connection through a relay and its hole punch raced the round: across
# NATs with 7 peers in groups of 3, round 0 failed for 3-5 of them in 4 of 5 runs.
CONNECT_AHEAD_PEERS = 16


def _board_digest(weights: torch.Tensor) -> str:
    """The digest of swarm weights as the run board shows it (``BASE_DIGEST_CHARS``)."""
    return weights_digest(weights)[:BASE_DIGEST_CHARS]


def _weights_digest(signed: SignedManifest) -> str:
    """The digest of a state's weights (``final`` on the run board); peers holding the same weights
    give the same digest whatever else their states hold."""
    return (signed.manifest.segment_digest("weights") or b"").hex()


def build_optimizer(config: RunConfig, model: GPT, reducer, nursery: trio.Nursery,
                    sharded_outer: ShardedOuter | None = None) -> SwarmOptimizer:
    def adamw() -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=config.inner_lr, weight_decay=config.weight_decay,
                                 betas=(0.9, 0.95))

    if config.algorithm == "diloco":
        return DiLoCo(model.parameters(), adamw(), reducer, inner_steps=config.inner_steps,
                      outer_lr=config.outer_lr, outer_momentum=config.outer_momentum, codec=config.averaging_codec,
                      overlap=config.overlap, nursery=nursery,
                      sharded=sharded_outer)
    if config.algorithm == "sync":
        return SyncOptimizer(model.parameters(), adamw(), reducer, codec=config.averaging_codec)
    return OneBitAdam(model.parameters(), reducer, lr=config.inner_lr, weight_decay=config.weight_decay,
                      betas=(0.9, 0.95), warmup_steps=config.warmup_steps, codec=config.averaging_codec)


def max_round_samples(config: RunConfig) -> int:
    """The most samples a peer can train on between two averagings of ``config``: what a
    contribution may weigh (a DiLoCo round lasts up to ``ALIGN_LIMIT`` rounds while a joiner aligns)."""
    steps = config.inner_steps * ALIGN_LIMIT if config.algorithm == "diloco" else 1
    return config.batch_size * config.accumulate * steps


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, batches: int, batch_size: int) -> float:
    """Mean loss on fixed validation batches: the same on every peer, so comparable."""
    model.eval()
    block, device = model.config.block_size, next(model.parameters()).device
    losses = []
    for i in range(batches):
        x, y = corpus.batch("val", batch_size, block, f"val/{i}".encode())
        losses.append(model(x.to(device), y.to(device))[1].item())
    model.train()
    return sum(losses) / len(losses)


class Trainer:
    """Trains ``config`` (or, if None, the run the swarm publishes) with ``peer`` until ``rounds``
    rounds are done (0: the run's own limit, else until ``stop()``)."""

    def __init__(self, peer: Peer, config: RunConfig | None = None, *, data: str | None = None,
                 device: str = "cpu", out: Path | None = None, rounds: int = 0, wait_peers: int = 1,
                 checkpoint_dir: Path | None = None, keep_checkpoints: int = 2,
                 max_upload_mbit: float | None = None, max_download_mbit: float | None = None,
                 max_state_bytes: int = 4 << 30) -> None:
        self.peer, self.config, self.data, self.device, self.out = peer, config, data, device, out
        self.rounds_override, self.wait_peers, self.max_state_bytes = rounds, wait_peers, max_state_bytes
        if checkpoint_dir is None and out is not None:
            checkpoint_dir = out / "checkpoints"
        self._temporary = None if checkpoint_dir else tempfile.TemporaryDirectory(prefix="legion-checkpoints-")
        if self._temporary:
            log.info("checkpoints go to a temporary directory; --checkpoint-dir (or --out) keeps them for a restart")
        self.store = ChunkStore(checkpoint_dir or Path(self._temporary.name), keep=keep_checkpoints)
        self.checkpoints = CheckpointSwarm(peer.host, peer.dht, peer.config.swarm, self.store,
                                           max_upload_mbit=max_upload_mbit, max_download_mbit=max_download_mbit,
                                           latest=self._latest_checkpoint, max_state_bytes=max_state_bytes,
                                           lanes=peer.lanes)
        self._checkpoint: SignedManifest | None = None
        self._checkpoint_lock = trio.Lock()
        self._checkpointed_at = 0.0
        self._metrics_lock = threading.Lock()
        self.sharded: ShardedOuter | None = None
        self.assignment: Assignment | None = None
        self._bids_seen: dict[str, Bid] = {}  # other peers' newest bids, kept until their leases end
        self._uploads = MeasuredUploads()  # of the peers this one averaged with, vouched for in its bid
        self.board: list[Progress] = []
        self._board_seen: dict[str, tuple[float, Progress]] = {}  # peer -> (trio time last read, its entry)
        self._board = board_place(peer.config.swarm, peer.peer_id.to_base58())  # where it reads and writes the run board
        self._config_published_at = -math.inf  # when this peer last published the run's configuration
        # one write of this peer's board entry at a time: of two racing, the older arrived second
        # at a node, which refused it (its newer was there), and the writer dropped that node
        self._publishing = trio.Lock()
        self._joinable: dict[int, str] | None = None  # see _watch_joinable_round
        # the digests of this peer's swarm weights at its last rounds, since it last took a state (_outnumbering)
        self._own_bases: dict[int, str] = {}
        self._looked_up_again = -math.inf  # trio time of the last ``RecordDHT.look_up_again``
        self.progress: Progress | None = None
        self.optimizer: SwarmOptimizer | None = None
        self.round_listeners: list[Callable[[RoundReport], None]] = [self._on_round]  # told of every round
        self._stop = threading.Event()
        self.finished = trio.Event()

    @property
    def me(self) -> str:
        return self.peer.peer_id.to_base58()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> dict:
        try:
            return await self._run()
        finally:
            self.finished.set()
            if self._temporary:
                self._temporary.cleanup()

    async def _run(self) -> dict:
        from_network = self.config is None
        config = self.config or await self._find_run()
        self.config = config
        if from_network and config.data and not self.data:
            # a path on the publisher's disk: taken from the network it could name any file here
            log.info("the run names data %r on its publisher's disk; this peer trains on its own --data "
                     "or the default corpus", config.data[:200])
        corpus = await trio.to_thread.run_sync(load_corpus, self.data or (None if from_network else config.data) or None)
        corpus.check(config.model_config().block_size, config.vocab_size)
        torch.manual_seed(config.seed)  # every peer starts from the same weights
        model = GPT(config.model_config()).to(self.device)
        self.progress = Progress(config.run_id, PROTOCOL)
        log.info("training run %s: %s GPT (%.2fM parameters), %s, corpus %s (%d tokens)", config.run_id,
                 config.model, model.num_params() / 1e6, config.algorithm, corpus.description, len(corpus.train))
        # How long a round waits for expected peers that do not show: DiLoCo rounds are long and
        # overlap training; synchronous steps are short and block it.
        budget = 10.0 if config.algorithm == "diloco" else 3.0
        averager = Averager(self.peer, target_group_size=config.group_size, matchmaking_budget=budget,
                            max_weight=max_round_samples(config))
        averager.matchmaker.reachability = lambda: self.peer.reach
        averager.matchmaker.relayed = lambda: [str(a) for a in self.peer.relays.addrs]
        reducer = SwarmReducer(averager, config.run_id, self._expected_peers, max_group=config.group_size,
                               timeout=config.round_timeout)
        reducer.listeners = self.round_listeners
        reducer.others_finished = lambda: any(p.final or 0 < config.rounds <= p.round for p in self._run_peers())
        if config.sharded:
            self.sharded = self._sharded_outer(config)
        async with trio.open_nursery() as nursery:
            optimizer = self.optimizer = build_optimizer(config, model, reducer, nursery, self.sharded)
            if isinstance(optimizer, DiLoCo):
                optimizer.agree_on_weights = True
                if self.out:
                    optimizer.on_applied = self._on_applied
            self.checkpoints.serve()
            nursery.start_soon(self.checkpoints.advertise_forever, self.peer.config.heartbeat, self.peer.ttl)
            nursery.start_soon(self._publish_progress)
            nursery.start_soon(self._watch_board)
            nursery.start_soon(self._connect_ahead)
            await self._resume_from_disk(optimizer)
            await self._refresh_board()
            ended = isinstance(optimizer, DiLoCo) and await self._take_the_final_weights_of_an_ended_run(optimizer)
            if not ended:
                await self._wait_for_peers(training=False)
                if self._donors(min_round=optimizer.round + 1):
                    await self._catch_up(optimizer)
            if isinstance(optimizer, DiLoCo):
                optimizer.fetch_state = self._fetch_from_swarm
                optimizer.last_round = self._rounds or None
                optimizer.swarm_round = lambda: None if self._joinable is None else max(self._joinable, default=-1)
                optimizer.swarm_base = lambda r: (self._joinable or {}).get(r, "")
                nursery.start_soon(self._watch_joinable_round, optimizer, reducer)
            if not ended:
                # Start only once the others can see this peer training, and it them: a peer that
                # thinks it is alone would take its first rounds alone and fall out of sync.
                self.progress.training = True
                await self._publish_once()
                await self._wait_for_peers(training=True)
            summary = await trio.to_thread.run_sync(self._train, model, corpus, optimizer)
            if isinstance(optimizer, DiLoCo):
                ended = ended or summary.get("final_weights") == "adopted"
                summary["final_weights"] = await self._settle_final_weights(optimizer)
                if summary["final_weights"] == "adopted":
                    summary["val_loss"] = await trio.to_thread.run_sync(
                        evaluate, model, corpus, config.eval_batches, config.batch_size)
                    self._record({"event": "final", **summary})
                    if self.out:
                        torch.save(model.state_dict(), self.out / "model.pt")
                elif ended:
                    summary["final_weights"] = "adopted"  # before training or during it: the run had ended
            else:
                await self._publish_once()
                await self._latest_checkpoint(config.run_id)  # a restart resumes from the final state
            await averager.linger()  # members of the last round may still need our part
            nursery.cancel_scope.cancel()
        return summary

    async def _find_run(self) -> RunConfig:
        """Wait until some peer publishes a run; a peer that cannot take part gets a clear error."""
        waited = 0.0
        while True:
            board = await self._board.read(self.peer.dht)
            if board.entries:
                config = choose_run(board.entries, await read_run_configs(self.peer.dht, self.peer.config.swarm))
                if config is not None:
                    return config
            if waited == 0.0:
                log.info("no training run (with its configuration) published in swarm %r yet; waiting for one",
                         self.peer.config.swarm)
            await trio.sleep(self.peer.config.heartbeat)
            waited += self.peer.config.heartbeat

    # ----- the run board
    async def _wait_for_peers(self, training: bool) -> None:
        """Wait until ``wait_peers`` peers (this one included) have joined the run (and, with
        ``training``, are training it), or until the run is past its first round: the start
        barrier is over then, and waiting for peers that may have left would never end (a peer
        slow to start, or restarted, catches up with the swarm instead)."""
        seen, run_id = 0, self.config.run_id
        # A read may miss entries on a loaded machine: a peer seen within an entry's lifetime counts.
        last_seen: dict[str, float] = {}
        while True:
            now = trio.current_time()
            last_seen.update({p.peer_id: now for p in self.board if p.run_id == run_id and (p.training or not training)})
            joined = {peer for peer, at in last_seen.items() if now - at <= self.peer.ttl} | {self.me}
            if len(joined) >= self.wait_peers or self._stop.is_set():
                return
            ahead = self._swarm_round()
            if ahead > 0:
                log.info("run %s is at round %d: not waiting for %d peers", run_id, ahead, self.wait_peers)
                return
            if len(joined) != seen:
                seen = len(joined)
                log.info("%d of %d peers joined run %s; waiting", seen, self.wait_peers, run_id)
            # Every read asks each other peer: with many waiting, reading twice a second would
            # saturate a small machine (16 peers, 2 cores: 480 requests/s). 0.5 s at 4 peers, 4 s at 16.
            await trio.sleep(max(0.5, self.wait_peers ** 2 / 64))
            await self._refresh_board()

    async def _connect_ahead(self) -> None:
        """Behind NAT, stay connected to the run's other peers while they are few
        (``CONNECT_AHEAD_PEERS``, ``Peer.connect_ahead``); a peer it could not reach is tried again
        after a few heartbeats."""
        heartbeat, retry_at = self.peer.config.heartbeat, {}
        while True:
            peers = [p.peer_id for p in self._run_peers() if not p.final]
            if len(peers) < max(self.config.group_size, CONNECT_AHEAD_PEERS):
                now = trio.current_time()
                for peer in await self.peer.connect_ahead([p for p in peers if retry_at.get(p, now) <= now]):
                    retry_at[peer] = now + CONNECT_AHEAD_RETRY_HEARTBEATS * heartbeat
            await trio.sleep(heartbeat)

    @property
    def _rounds(self) -> int:
        """The rounds this peer trains the run for (0: no end)."""
        return self.rounds_override or self.config.rounds

    def _others_training(self) -> list[Progress]:
        """The board's entries of the other peers training this run."""
        return [p for p in self._run_peers() if p.training]

    def _run_peers(self) -> list[Progress]:
        """The board's entries of the other peers of this run, training or finished."""
        return [p for p in self.board if p.run_id == self.config.run_id and p.peer_id != self.me]

    def _expected_peers(self) -> int:
        """Peers expected in a round: all that train the run (estimated, where this peer reads one
        bucket of a large board). Rounds can be faster than the board refreshes, so a board round
        says little about where a peer is now; one that is really behind costs a matchmaking
        budget, then catches up from a peer's state."""
        seen = 1 + len({p.peer_id for p in self._others_training()})
        return max(seen, self._board.estimate) if self._board.level else seen

    async def _watch_joinable_round(self, optimizer: DiLoCo, reducer: SwarmReducer) -> None:
        """While the optimizer waits to join the swarm after adopting a peer's state R: the rounds
        (of R, R+1 and R+2) whose group the other peers seek now and wait for more peers in, found
        in the DHT, each with the base (weights' digest) they declare there (the optimizer joins
        the newest); empty while there is none, None when no other peer trains. The others may
        form R+1's group without this peer if they did not yet see it training, then wait for it
        in R+2's, which they cannot reach before, or still be stuck in R's: the DHT shows which."""
        while True:
            joinable = None
            if optimizer.awaiting_swarm and self._others_training():
                joinable = {}
                for round_ in range(optimizer.round, optimizer.round + 3):
                    with trio.move_on_after(self.peer.config.network_timeout):
                        base = await reducer.open_to_join(f"diloco-{round_}")
                        if base is not None:
                            joinable[round_] = base
            self._joinable = joinable
            await trio.sleep(0.5)

    def _swarm_round(self) -> int:
        """The round the other peers are at, as far as one of them alone cannot inflate it: the
        second highest they claim (the highest with a single other peer), 0 with none."""
        rounds = sorted((p.round for p in self._others_training()), reverse=True)
        return rounds[min(1, len(rounds) - 1)] if rounds else 0

    def _others_about_to_reach(self, round_: int) -> bool:
        """Whether the board shows the others short of ``round_`` and some of them averaged one of
        the two rounds before it: a state of ``round_`` is then on its way."""
        if self._swarm_round() >= round_:
            return False
        averaged = [p.group_key.rpartition("-")[2] for p in self._others_training()]
        return any(key.isdigit() and int(key) >= round_ - 2 for key in averaged)

    def _donors(self, min_round: int, among: Collection[str] | None = None) -> list[str]:
        """Peers to offer their state (of ``among``, if given), the most advanced first (random
        among equals, so joiners spread over them), none claiming more than a round beyond the
        swarm's round."""
        plausible = self._swarm_round() + 1
        ahead = [p for p in self._others_training()
                 if min_round <= p.round <= plausible and (among is None or p.peer_id in among)]
        random.shuffle(ahead)
        return [p.peer_id for p in sorted(ahead, key=lambda p: -p.round)][:MAX_WITNESSES]

    async def _refresh_board(self) -> None:
        """Read the run board. An entry missing from one read (a slow or cut-off DHT node answered
        late, a refresh that came late) stays on the board for ``BOARD_MEMORY_TTLS`` entry
        lifetimes: a peer that saw the others vanish for one read would step alone, and its
        weights would part from theirs for good."""
        # A read is a lookup, then one request to each of the closest peers, each step within the
        # network timeout; a bound of one timeout cut every read short on a loaded machine
        # (16 peers on 2 cores), and peers that never saw the last of the others waited forever.
        limit = 2 * self.peer.config.network_timeout + 1
        read, level = None, self._board.level
        with trio.move_on_after(limit):
            read = await self._board.read(self.peer.dht)
        if read is None:
            log.info("reading the run board took over %.0f s; keeping the last one read", limit)
        else:
            if level is not None and read.level != level:
                log.info("the run board holds about %d peers: this peer's entry moves to level %d", read.estimate, read.level)
            # the same peers write the member list and the holdings: their entries go to the same level
            self.peer.member_place.adopt(read.level, read.estimate)
            self.checkpoints.holdings_place.adopt(read.level, read.estimate)
        now = trio.current_time()
        for progress in read.entries if read is not None else []:
            self._board_seen[progress.peer_id] = (now, progress)
        memory = BOARD_MEMORY_TTLS * self.peer.ttl * self._board.refresh_beats
        self._board_seen = {peer: seen for peer, seen in self._board_seen.items() if now - seen[0] <= memory}
        self.board = [progress for _, progress in self._board_seen.values()]

    async def _publish_once(self) -> None:
        """This peer's board entry, and the run's configuration where this peer is one of its few
        publishers (``run_board.publishes_config``)."""
        swarm = self.peer.config.swarm
        with trio.move_on_after(self.peer.ttl - self.peer.config.heartbeat):
            async with self._publishing:
                # what the others act on is written at once; the rest (round, loss...) at each refresh
                turns = (self.progress.run_id, self.progress.training, self.progress.final, self.progress.settled)
                if self._board.refresh_due(turns):
                    await self._board.write(self.peer.dht, self.progress.to_value(), self.peer.ttl, compared=turns)
                # it never changes: a long lifetime, refreshed rarely
                lifetime = min(MAX_TTL, RUN_CONFIG_HEARTBEATS * self.peer.config.heartbeat)
                if publishes_config(self.me, self._expected_peers()) and \
                        trio.current_time() - self._config_published_at >= lifetime / 3:
                    await self.peer.dht.store(run_configs_key(swarm), self.config.to_dict(), lifetime)
                    self._config_published_at = trio.current_time()

    async def _publish_progress(self) -> None:
        """This peer's board entry, refreshed on its own (every heartbeat in a small swarm,
        ``BucketPlace.refresh_beats``): a slow board read must not delay it past its lifetime
        (the others would think this peer gone, and step alone)."""
        while True:
            await self._publish_once()
            await trio.sleep(self.peer.config.heartbeat)

    async def _watch_board(self) -> None:
        """Read the run board as often as its entries are refreshed (every heartbeat, every
        ``refresh_beats`` once it is split in buckets: a large swarm, where its reads were most of
        the DHT's load, ``bench/scale.py --only dht``); renew this peer's shard bid every heartbeat."""
        beat = 0
        while True:
            if beat % self._board.refresh_beats == 0:
                await self._refresh_board()
            beat += 1
            if self.sharded:
                await self._renew_bid()
            if time.monotonic() - self._checkpointed_at >= CHECKPOINT_SECONDS:
                await self._latest_checkpoint(self.config.run_id)
            await trio.sleep(self.peer.config.heartbeat)

    # ----- shard ownership
    def _bid(self):
        return own_bid(self.me, self.peer.started_at, self.peer.config.upload_mbps, resources.available_memory(),
                       self._uploads.current())

    def _sharded_outer(self, config: RunConfig) -> ShardedOuter:
        layout, self.assignment = run_assignment(config, [self._bid()])  # alone until the bids are read
        outer = ShardedOuter(self.peer.host, layout, lr=config.outer_lr, momentum=config.outer_momentum,
                             run_id=config.run_id, assignment=lambda: self.assignment,
                             peers=self._shard_candidates, digest=weights_digest,
                             timeout=min(10.0, config.round_timeout / 4))
        outer.register()
        return outer

    def _shard_candidates(self) -> list[str]:
        """Peers that may hold a shard's momentum or new slice: those the board shows training, and
        every connected peer (the board lags; an averaging group's members are all connected)."""
        connected = {peer_id.to_base58() for peer_id in self.peer.host.get_connected_peers()}
        return sorted(connected | {p.peer_id for p in self._others_training()})

    async def _renew_bid(self) -> None:
        """Renew this peer's lease on its shards and take the owners the bids give now."""
        before = self.assignment.shards_of(self.me)
        self.assignment = await bid_and_assign(self.peer.dht, self.peer.config.swarm, self.config, self._bid(),
                                               self.peer.ttl, self._bids_seen)
        now = self.assignment.shards_of(self.me)
        if now != before:
            log.info("owns shards %s of %d (%d replicas)", now, len(self.assignment.owners), self.config.replicas)
            self._record({"event": "shards", "owned": now})

    # ----- checkpoints
    async def _latest_checkpoint(self, run_id: str) -> SignedManifest | None:
        """This peer's newest state as a version on disk, made from the optimizer's snapshot when
        the last one is older: what peers fetching the run's state are offered."""
        if self.config is None or run_id != self.config.run_id or self.optimizer is None:
            return None
        async with self._checkpoint_lock:
            snapshot = self.optimizer.snapshot
            # (and when the optimizer is behind the last one: it went back to the others' round)
            if snapshot is not None and (self._checkpoint is None or self._checkpoint.manifest.round < snapshot[0]
                                         or self.optimizer.round < self._checkpoint.manifest.round):
                round_, tensors = snapshot
                self._checkpoint = await trio.to_thread.run_sync(
                    lambda: self.store.save(tensors, run_id, round_, self.peer.key_pair,
                                            meta={"config": self.config.to_dict()}))
                self._checkpointed_at = time.monotonic()
        return self._checkpoint

    async def _resume_from_disk(self, optimizer: SwarmOptimizer) -> None:
        """A restarted peer starts from its newest complete version of the run on disk."""
        for signed in self.store.complete(self.config.run_id):
            try:
                tensors = await trio.to_thread.run_sync(self.store.load, signed)
                await trio.to_thread.run_sync(optimizer.load_state, signed.manifest.round, tensors)
            except (ChunkError, ManifestError, StateError) as exc:
                log.warning("cannot resume from round %d on disk: %s", signed.manifest.round, exc)
                continue
            self._checkpoint = signed
            log.info("resumed run %s from round %d on disk", self.config.run_id, signed.manifest.round)
            self._record({"event": "state", "source": "disk", "round": signed.manifest.round})
            return

    async def _fetch_from_swarm(self, min_round: int, among: Collection[str] | None = None, *,
                                skip_if_held: bool = False) -> tuple[int, dict | None] | None:
        """The newest state of the most advanced peer (of ``among``, if given) if it is at
        ``min_round`` or later, else None. With ``skip_if_held``, a state of the round of this
        peer's own newest state, with its weights, is not fetched: ``(round, None)`` says the
        peer holds it (after a round that failed for every peer, each fetched a state of its own
        round with its own weights, and with it another peer's inner optimizer state).
        Its chunks come from every peer holding them; those held already stay. The board lags the
        peers by up to a heartbeat, so a donor a round short is asked again, for two heartbeats. The
        first asking is not cut short: through a relay, dialling the donors alone can take longer
        than two heartbeats, and a relayed peer whose asking was cut there never caught up. While
        the others are short of ``min_round`` but averaged lately, it asks for longer (up to
        ``CATCH_UP_PATIENCE_HEARTBEATS``, at most a round timeout):
        a peer whose round failed at its deadline is a round ahead of groups still averaging
        (two-level rounds took 27 s against a 20 s deadline), and gave up on every state before they
        made it, round after round (a 9-peer run: 7 rounds failed in a row, 2 heartbeats each time).
        Where none averaged lately (peers that cannot reach each other), no state is coming: waiting
        then cost peers behind NATs a round timeout a round (tests/test_internet.py, in CI); and a
        peer that can reach only one of two witnesses waits in vain, hence the bound."""
        started = trio.current_time()
        heartbeat = self.peer.config.heartbeat
        deadline = started + 2 * heartbeat
        patience = started + min(self.config.round_timeout, CATCH_UP_PATIENCE_HEARTBEATS * heartbeat)
        while True:
            await self._refresh_board()
            donors = self._donors(0, among)
            if not donors:
                return None
            offered = await self._offered_states(donors)
            offers = self._attested_state(offered, min_round)
            now = trio.current_time()
            if offers or now >= patience or (now >= deadline and not self._others_about_to_reach(min_round)):
                break
            await trio.sleep(0.5)
        swarm_round = self._swarm_round()
        if not offers and skip_if_held and swarm_round < min_round:
            # Out of sync and ahead of the others (its round failed, or it stepped alone, while they
            # still average an earlier round): the swarm's state is of their round. Waiting for one
            # of its own round, a peer SIGSTOPped past its rounds stayed a round ahead of the others
            # to the end of a run, failing every round, and ended with weights of its own
            # (bench/chaos.py --churn 0.5 --partition --seed 2, 2026-12-06): it goes back to theirs,
            # among the states its donors just offered
            offers = self._attested_state(offered, swarm_round)
            if offers:
                log.info("out of sync and a round or more ahead of the others (at round %d): taking their state of "
                         "round %d", min_round, offers[0].manifest.round)
        if not offers:
            log.warning("no state of round %d or later that %s attest alike; not adopting any",
                        min_round, "two peers" if self._witnesses() > 1 else "the other peer")
            # its view of the board may be stale (a healed partition): the next reads look again
            if now - self._looked_up_again >= RELOOKUP_SECONDS:
                self._looked_up_again = now
                self.peer.dht.look_up_again()
            return None
        own = await self._latest_checkpoint(self.config.run_id) if skip_if_held else None
        # (a state of an earlier round with this peer's weights: its rounds since failed, and the
        # others' did too or are yet to end; it stays at its round and meets them at the next)
        if own is not None and offers[0].manifest.round <= own.manifest.round \
                and _weights_digest(offers[0]) == _weights_digest(own):
            log.info("holds the swarm's weights of round %d already; nothing to fetch", own.manifest.round)
            self._record({"event": "in_sync", "round": own.manifest.round})
            return own.manifest.round, None
        # The signers of one attested state in turn: its chunks besides the weights (the signer's
        # optimizer state) are often held by the signer alone, and a signer that left mid-download
        # leaves them missing; another signer's version shares the weights' chunks, fetched already.
        for signed in offers[:MAX_DONORS_TRIED]:
            donor = signed.signer
            sources = [donor, *(p.peer_id for p in self._others_training() if p.peer_id != donor)]
            try:
                stats = await self.checkpoints.download(signed, sources, timeout=self.config.round_timeout * 10)
                tensors = await trio.to_thread.run_sync(self.store.load, signed)
            except (DownloadError, ChunkError, ManifestError) as exc:
                log.warning("fetching round %d from the swarm failed: %s", signed.manifest.round, exc)
                continue
            self._record({"event": "state", "source": "swarm", "round": signed.manifest.round,
                          "size_bytes": stats.size_bytes, "reused_bytes": stats.reused_bytes,
                          "bytes_received": stats.bytes_received, "duplicate_bytes": stats.duplicate_bytes,
                          "peers": len(stats.per_peer)})
            return signed.manifest.round, tensors
        return None

    def _attested_state(self, offered: list[SignedManifest], min_round: int) -> list[SignedManifest]:
        """Of the states donors ``offered`` (``_offered_states``), one of round ``min_round`` or
        later whose weights ``_witnesses()`` of them hold alike: a single peer cannot make others
        adopt weights it made up. The newest such state (of the newest round's, the one most of
        them offer), as its signers' versions of it in random order; none if there is none."""
        offers = [o for o in offered if o.manifest.round >= min_round]
        witnesses = self._witnesses()
        alike: dict[tuple[int, bytes | None], list[SignedManifest]] = {}
        for offer in offers:
            alike.setdefault((offer.manifest.round, offer.manifest.segment_digest("weights")), []).append(offer)
        attested = [group for (_, digest), group in alike.items()
                    if digest is not None and len({o.signer for o in group}) >= witnesses]
        if not attested:
            if len(alike) > 1:
                log.info("peers offer %d different states: %s", len(alike),
                         ", ".join(f"round {r} ({len(g)})" for (r, _), g in alike.items()))
            return []
        # of the newest round's, the state most peers offer: after a round that failed for most
        # peers, those still hold the weights they had, and a pair whose round averaged holds
        # others; picking either at random left 5 peers with theirs and 2 apart (bench/internet.py)
        group = max(attested, key=lambda group: (group[0].manifest.round, len({o.signer for o in group})))
        return random.sample(group, len(group))

    async def _offered_states(self, peers: list[str]) -> list[SignedManifest]:
        """The newest state of this run each of ``peers`` offers (asked all at once)."""
        offers: list[SignedManifest] = []

        async def ask(peer: str) -> None:
            offered = await self.checkpoints.fetch_manifest(peer, run_id=self.config.run_id,
                                                            timeout=self.peer.config.network_timeout * 2)
            if offered is not None:
                offers.append(offered)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        return offers

    def _witnesses(self) -> int:
        """How many peers must offer a state alike for this peer to adopt it: two, or one when only
        one other peer is in the run. Peers that joined but do not train yet count: at a run's
        start a lone peer shown training (claiming round 1,000,000, say) is not the swarm, and
        honest peers about to start adopted its state (tests/test_hostile_peers.py, once in CI)."""
        return min(2, len([p for p in self._run_peers() if not p.final]))

    async def _catch_up(self, optimizer: SwarmOptimizer) -> None:
        fetched = await self._fetch_from_swarm(optimizer.round + 1)
        if fetched is not None:
            await trio.to_thread.run_sync(self._adopt, optimizer, fetched)

    def _adopt(self, optimizer: SwarmOptimizer, fetched: tuple[int, dict]) -> bool:
        try:
            optimizer.load_state(*fetched)
        except StateError as exc:  # a donor with another model, or a hostile one
            log.warning("ignoring a peer's state: %s", exc)
            return False
        self._own_bases.clear()  # the weights this peer held before are compared no more (_outnumbering)
        if isinstance(optimizer, DiLoCo):
            self._record({"event": "adopted", "round": optimizer.round, "digest": weights_digest(optimizer.global_weights)})
        return True

    # ----- the end of a run
    async def _settle_final_weights(self, optimizer: DiLoCo) -> str:
        """Settle with the other peers on one set of final weights (``swarm.final_weights``):
        publish this peer's, wait until the others finished (or a deadline), fetch the agreed
        weights if this peer holds others (a peer restarted late may have stepped its last
        rounds alone), then stay while the others settle (up to a second deadline), as they may
        fetch from it, and take the weights most of them hold if that changes as later peers
        finish (two peers that finished 40 s before the other six of a chaos run settled between
        themselves, then left with weights no other survivor held). Returns ``own`` (kept its
        weights), ``adopted``, or ``differs`` (could not fetch the agreed weights: said in the log)."""
        final_round = optimizer.round
        self.progress.final = await self._save_final_state(optimizer)
        self.peer.dht.look_up_again()  # the board as it is now: all peers' final weights are compared here
        await self._publish_once()
        heartbeat = self.peer.config.heartbeat
        allowance = self.config.round_timeout + FINAL_HEARTBEATS * heartbeat
        deadline = trio.current_time() + allowance
        while True:
            await self._refresh_board()
            if not self._others_training() or trio.current_time() >= deadline:
                break
            await trio.sleep(min(1.0, heartbeat))
        outcome, unfetched = "own", set()  # digests whose fetch failed: not tried again
        deadline += allowance  # the second allowance: others may still decide, then fetch from here
        said = None
        while True:
            finals = self._finals(final_round)
            agreed = agreed_digest(self.progress.final, finals)
            acts = agreed != self.progress.final and agreed not in unfetched
            if acts or said != (len(finals), agreed):  # said again whenever it changes or this peer adopts
                said = len(finals), agreed
                log.info("final weights of round %d: %d of %d other peers that finished hold this peer's, %d the "
                         "agreed ones", final_round, sum(d == self.progress.final for d in finals.values()),
                         len(finals), sum(d == agreed for d in finals.values()))
            if acts:
                adopted = await self._take_the_agreed_final_weights(optimizer, final_round, finals, agreed)
                outcome = "adopted" if adopted else "differs"
                if not adopted:
                    unfetched.add(agreed)
            # Settled (its choice final: the others need not wait for it) only once no other peer
            # trains: a peer a round ahead of the others that settled on its own weights at its first
            # deadline let them leave as they finished, and then could fetch theirs from none (a chaos
            # run, 2026-12-06: it ended with weights no other survivor held)
            if not self.progress.settled and not self._others_training():
                self.progress.settled = True
                await self._publish_once()
            # Peers that decided at the same moment on different views may hold different weights
            # now: each looks again until no peer trains, lacks its final weights, or is unsettled
            # (it may be taking others: a peer that left as soon as every peer holding other weights
            # had settled never saw one holding its own take those, and ended in the minority, apart);
            # one not yet showing its final weights may be between its last round and publishing them.
            if trio.current_time() >= deadline or not any(
                    p.training or not p.final or not p.settled for p in self._run_peers()):
                return outcome
            await trio.sleep(min(1.0, heartbeat))
            await self._refresh_board()

    async def _take_the_agreed_final_weights(self, optimizer: DiLoCo, final_round: int, finals: dict[str, str],
                                             agreed: str) -> bool:
        """Take the final weights ``agreed`` of round ``final_round``, which this peer does not hold,
        from the finished peers ``finals`` that hold them: True if it took them, False if it could
        not fetch them."""
        holders = [peer for peer, digest in finals.items() if digest == agreed]
        adopted = await self._adopt_final(optimizer, final_round, agreed, holders)
        if adopted:
            self.progress.final = await self._save_final_state(optimizer)
            await self._publish_once()
        log.info("final weights: %s those %d of %d other peers hold", "adopted" if adopted else "could not fetch",
                 len(holders), len(finals))
        return adopted

    def _finals(self, final_round: int) -> dict[str, str]:
        """The other peers of the run that finished round ``final_round``, with their final weights' digests."""
        return {p.peer_id: p.final for p in self._run_peers() if p.final and p.round == final_round}

    async def _save_final_state(self, optimizer: DiLoCo) -> str:
        """Checkpoint the final state (signed by this peer: what a restart resumes from and what
        others fetch) and return its weights' digest, as the run board shows it."""
        async with self._checkpoint_lock:
            self._checkpoint = await trio.to_thread.run_sync(
                lambda: self.store.save(optimizer.state_tensors(), self.config.run_id, optimizer.round,
                                        self.peer.key_pair, meta={"config": self.config.to_dict()}))
        return _weights_digest(self._checkpoint)

    async def _take_the_final_weights_of_an_ended_run(self, optimizer: DiLoCo) -> bool:
        """A peer behind the others' end of the run takes the final weights at least two of them
        settled on, rather than step its remaining rounds alone, where more peers have finished
        than still train (itself included): one that starts (or restarts) after the others
        finished (a chaos run restarted a peer as they finished: it stepped 10 rounds alone, then
        adopted theirs), and one left behind mid-run (after a partition healed, four peers
        finished in pairs while three whose rounds failed stepped their last 10 rounds alone, 20 s
        each: ``bench/chaos.py --kinds partition``). True if it took them: it has no round left."""
        rounds = self._rounds
        if not rounds or optimizer.round >= rounds:
            return False
        finals = self._finals(rounds)
        digest = settled_digest(finals)
        if digest is None or len(finals) <= 1 + len(self._others_training()):
            return False
        holders = [peer for peer, held in finals.items() if held == digest]
        log.info("run %s ended for %d peers (%d hold the weights they settled on); this peer (at round %d) takes "
                 "those instead of stepping the rest alone", self.config.run_id, len(finals), len(holders),
                 optimizer.round)
        return await self._adopt_final(optimizer, rounds, digest, holders)

    async def _adopt_final(self, optimizer: DiLoCo, final_round: int, digest: str, holders: list[str]) -> bool:
        """Fetch the final state whose weights' digest is ``digest`` from the peers that hold it."""
        offers = [o for o in await self._offered_states(holders[:MAX_WITNESSES])
                  if o.manifest.round == final_round and _weights_digest(o) == digest]
        if not offers:
            log.warning("no peer offers the final weights the others settled on (%s); this peer's differ", digest[:16])
            return False
        random.shuffle(offers)
        for offer in offers:  # the rest of a state (optimizer moments) only its signer holds
            try:
                await self.checkpoints.download(offer, [offer.signer, *(h for h in holders if h != offer.signer)],
                                                timeout=self.config.round_timeout * 2)
                tensors = await trio.to_thread.run_sync(self.store.load, offer)
            except (DownloadError, ChunkError, ManifestError) as exc:
                log.warning("fetching the final weights the others settled on from %s failed: %s", offer.signer, exc)
                continue
            return await trio.to_thread.run_sync(self._adopt, optimizer, (final_round, tensors))
        return False

    def _on_applied(self, round_: int, reduced: Reduced | None) -> None:
        """A line per round applied (DiLoCo, with ``out``): the members of the group whose average
        it was (none: the round failed) and a digest of the swarm weights after it, so that a
        watcher can check that every member of a group holds the same weights (``bench/chaos.py``)."""
        optimizer = self.optimizer
        self._record({"event": "applied", "round": round_, "members": list(reduced.members) if reduced else [],
                      "digest": weights_digest(optimizer.global_weights)})

    # ----- the training thread
    def _train(self, model: GPT, corpus: Corpus, optimizer: SwarmOptimizer) -> dict:
        config, progress = self.config, self.progress
        rounds = self._rounds
        block, batch = config.model_config().block_size, config.batch_size
        samples_per_step = batch * config.accumulate
        # mixed precision on GPUs; CPUs train in float32
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.startswith("cuda") \
            else contextlib.nullcontext()
        initial = val_loss = evaluate(model, corpus, config.eval_batches, batch)
        started, steps, last_eval, tokens_window, window_start = time.monotonic(), 0, 0, 0, time.monotonic()
        took_final = False  # the final weights the others settled on, the run having ended for most peers
        progress.val_loss = val_loss
        self._record({"event": "start", "val_loss": val_loss, "round": optimizer.round})
        try:
            while not self._stop.is_set() and (not rounds or optimizer.rounds_begun < rounds):
                loss_sum = 0.0
                for micro in range(config.accumulate):  # gradients of the whole local batch
                    x, y = corpus.batch("train", batch, block, f"{self.me}/{steps}/{micro}".encode())
                    with autocast:
                        _, loss = model(x.to(self.device), y.to(self.device))
                    value = loss.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(f"training loss is {value} at step {steps}")
                    (loss / config.accumulate).backward()
                    loss_sum += value
                if config.lr_schedule != "constant":  # over the run's rounds, the same for every peer
                    optimizer.set_lr(config.inner_lr * lr_factor(config.lr_schedule,
                                                                 optimizer.round_progress / config.rounds))
                ended = optimizer.step(samples_per_step)
                optimizer.zero_grad()
                steps += 1
                tokens_window += samples_per_step * block
                progress.step, progress.loss = steps, loss_sum / config.accumulate
                progress.samples += samples_per_step
                if not ended:
                    continue
                now = time.monotonic()
                progress.tokens_per_second = tokens_window / max(1e-9, now - window_start)
                tokens_window, window_start = 0, now
                self._note_weights(optimizer)  # before the checks: the board shows the others at this round too
                if isinstance(optimizer, DiLoCo) and trio.from_thread.run(self._take_the_final_weights_of_an_ended_run,
                                                                          optimizer):
                    took_final = True
                    break
                if optimizer.out_of_sync or self._behind(optimizer):
                    # still shown training: the others keep expecting this peer, which is back
                    # in a round or two (hidden, it would find their groups formed without it)
                    fetched = trio.from_thread.run(partial(self._fetch_from_swarm, optimizer.round, skip_if_held=True))
                    if fetched is not None and fetched[1] is not None:
                        self._adopt(optimizer, fetched)
                    # in sync now, or nobody to sync with; else the next round end tries again:
                    # averaging from weights of its own, this peer would stay apart for good
                    optimizer.out_of_sync = fetched is None and bool(self._others_training())
                elif holders := self._outnumbering():
                    self._take_the_weights_most_hold(optimizer, holders)
                if steps - last_eval >= EVAL_EVERY_STEPS:
                    progress.val_loss, last_eval = evaluate(model, corpus, config.eval_batches, batch), steps
                self._update_traffic(optimizer)
                self._record({"event": "round", "round": optimizer.round, "step": steps,
                                       "loss": progress.loss, "val_loss": progress.val_loss, "val_step": last_eval,
                                       "tokens_per_second": progress.tokens_per_second,
                                       "bytes_sent": progress.bytes_sent, "bytes_received": progress.bytes_received,
                                       "group_size": progress.group_size, "wait_seconds": optimizer.stats.wait_seconds})
            optimizer.finish()
            val_loss = evaluate(model, corpus, config.eval_batches, batch)
            progress.val_loss = val_loss
            self._update_traffic(optimizer)
            elapsed = time.monotonic() - started
            summary = {"event": "done", "run_id": config.run_id, "round": optimizer.round, "steps": steps,
                       "initial_val_loss": initial, "val_loss": val_loss, "seconds": elapsed,
                       "samples_per_second": steps * samples_per_step / elapsed, "bytes_sent": progress.bytes_sent,
                       "bytes_received": progress.bytes_received,
                       "wait_fraction": optimizer.stats.wait_seconds / elapsed,
                       "rounds_averaged": optimizer.stats.rounds_averaged,
                       "rounds_alone": optimizer.stats.rounds_alone, "rounds_failed": optimizer.stats.rounds_failed,
                       "checkpoint_bytes_fetched": self.checkpoints.download_limit.total,
                       "relayed_bytes": self.peer.relays.relayed_bytes, **self._outer_summary(optimizer),
                       **({"final_weights": "adopted"} if took_final else {})}
            self._record(summary)
            if self.out:
                torch.save(model.state_dict(), self.out / "model.pt")
            return summary
        finally:
            progress.training = False

    def _outer_summary(self, optimizer: SwarmOptimizer) -> dict:
        """What this peer holds of the outer optimizer's state (DiLoCo)."""
        if self.sharded:
            stats = self.sharded.stats
            return {"outer_state_bytes": self.sharded.state_bytes, "shards_owned": self.assignment.shards_of(self.me),
                    "momentum_handovers": stats.momentum_handovers, "momentum_lost": stats.momentum_lost}
        outer = getattr(optimizer, "outer", None)
        return {"outer_state_bytes": outer.buffer.numel() * 4} if outer is not None else {}

    def _outnumbering(self) -> list[str]:
        """The other peers training that hold other weights than this peer at one of its last
        rounds, where they outnumber those holding its own (``swarm.final_weights.outnumbering``;
        DiLoCo only: other algorithms publish no digest)."""
        return outnumbering(self._own_bases, {p.peer_id: shown for p in self._others_training()
                                              if (shown := p.weights_shown()) is not None}, self.me)

    def _take_the_weights_most_hold(self, optimizer: DiLoCo, holders: list[str]) -> None:
        """Take the state of the peers that outnumber this peer's lineage (the training thread)."""
        round_ = optimizer.round
        log.warning("round %d: %d other peers hold other weights than this peer's, more than hold its own (or as "
                    "many, with the smallest peer id); taking theirs", round_, len(holders))
        own = self._own_bases.get(round_) or _board_digest(optimizer.global_weights)
        fetched = trio.from_thread.run(self._fetch_from_swarm, round_, holders)
        if fetched is not None and fetched[0] == round_ and isinstance(fetched[1].get("weights"), torch.Tensor) \
                and _board_digest(fetched[1]["weights"].float()) == own:
            log.info("round %d: those peers hold this peer's weights now", round_)
            fetched = None
        adopted = fetched is not None and self._adopt(optimizer, fetched)
        self._record({"event": "lineage", "round": round_, "holders": len(holders), "adopted": adopted})

    def _note_weights(self, optimizer: SwarmOptimizer) -> None:
        """Keep the digest of this peer's swarm weights at its round (DiLoCo), once a round and
        again after it took a state; its board entry shows it (``Progress.show_weights``). Not
        while it joins a round whose state is on its way: its weights are an earlier round's (two
        peers doing so showed a third other weights, and it took a state)."""
        if isinstance(optimizer, DiLoCo) and optimizer.agree_on_weights and not optimizer.joining \
                and optimizer.round not in self._own_bases:
            self._own_bases[optimizer.round] = _board_digest(optimizer.global_weights)
            self._own_bases = {r: d for r, d in self._own_bases.items() if r > optimizer.round - OWN_BASES_KEPT}

    def _behind(self, optimizer: SwarmOptimizer) -> bool:
        return bool(self._others_training()) and self._swarm_round() - optimizer.round >= 2

    def _update_traffic(self, optimizer: SwarmOptimizer) -> None:
        stats, progress = optimizer.stats, self.progress
        progress.round = optimizer.round
        self._note_weights(optimizer)
        if optimizer.round in self._own_bases:
            # published only now, after the round end's checks: a digest shown before a peer took
            # another lineage's state stayed on the others' boards, and one of the larger lineage
            # read it after the others had moved, and moved too
            progress.show_weights(optimizer.round, self._own_bases[optimizer.round])
        progress.bytes_sent, progress.bytes_received = stats.bytes_sent, stats.bytes_received
        progress.group_size = stats.last_group_size
        progress.rounds_averaged, progress.rounds_alone = stats.rounds_averaged, stats.rounds_alone
        progress.rounds_failed = stats.rounds_failed

    def _on_round(self, report: RoundReport) -> None:
        """Publish the last averaged round, and its group where this peer is the group's first
        member (the dashboard shows recent groups; one entry holding the list is enough, and the
        list was two thirds of every board entry's bytes: ``bench/scale.py --only dht``), keep the
        uploads measured of its members for this peer's shard bid, and record every round's outcome."""
        if report.outcome == "averaged":
            self._uploads.add(report.uploads_seen)
            members = sorted(report.members)[:MAX_GROUP]
            self.progress.group_key, self.progress.group = report.key, members if members[:1] == [self.me] else []
        self._record({"event": "reduced", "key": report.key, "outcome": report.outcome,
                      "members": sorted(report.members), "group": report.group, "seconds": round(report.seconds, 3),
                      **({"reason": report.reason[:300]} if report.reason else {}),
                      **({"uploads_mbit": {p: round(v, 1) for p, v in report.uploads_seen.items()}}
                         if report.uploads_seen else {})})

    def _record(self, event: dict) -> None:
        """A line of ``metrics.jsonl`` (from the training thread or the trio side)."""
        if self.out:
            with self._metrics_lock, (self.out / "metrics.jsonl").open("a") as metrics:
                metrics.write(json.dumps({"time": time.time(), **event}) + "\n")

