"""The run board: where every training peer publishes its run's configuration and its progress
(round, loss, throughput, traffic). Peers read it to learn what to train, how many peers to
expect in a round, which round the swarm is in, and whom to fetch the state from. In a swarm of
more than 64 peers each peer reads only its bucket of the board, which also estimates the
swarm's size (``dht.buckets``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from dht import RecordDHT
from dht.buckets import BucketRead, own_bucket_key, read_buckets
from swarm.run_config import PROTOCOL, RunConfig, RunConfigError


MAX_GROUP = 64  # members of a published group (a round's group is at most RunConfig.group_size)


def run_key(swarm: str) -> str:
    """The run board's key (split into buckets in a large swarm: ``dht.buckets``)."""
    return f"/legion/{swarm}/run"


def own_board_key(swarm: str, peer_id: str, level: int) -> str:
    """Where ``peer_id`` writes its board entry at ``level``."""
    return own_bucket_key(run_key(swarm), peer_id, level)


@dataclass
class Progress:
    run_id: str
    protocol: int
    config: dict
    round: int = 0
    step: int = 0
    samples: int = 0
    loss: float | None = None
    val_loss: float | None = None
    tokens_per_second: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    group_size: int = 1
    training: bool = False  # False while joining or catching up
    rounds_averaged: int = 0
    rounds_alone: int = 0
    rounds_failed: int = 0
    group_key: str = ""  # the last round this peer averaged in ("diloco-12")...
    group: list[str] = field(default_factory=list)  # ...and that round's contributors
    final: str = ""  # once finished: the digest of its final weights (swarm.final_weights)...
    settled: bool = False  # ...and whether they are the ones it leaves with
    peer_id: str = field(default="", compare=False)

    def to_value(self) -> dict:
        value = asdict(self)
        del value["peer_id"]
        return value

    @classmethod
    def from_value(cls, peer_id: str, value) -> "Progress":
        if not isinstance(value, dict):
            raise ValueError("progress is not a map")
        try:
            progress = cls(**value, peer_id=peer_id)
        except TypeError as exc:
            raise ValueError(f"progress has unexpected fields: {exc}") from exc
        numbers = (progress.step, progress.samples, progress.bytes_sent, progress.bytes_received, progress.group_size,
                   progress.rounds_averaged, progress.rounds_alone, progress.rounds_failed)
        if not (isinstance(progress.run_id, str) and isinstance(progress.config, dict)
                and isinstance(progress.round, int) and isinstance(progress.protocol, int)
                and all(isinstance(n, int) and n >= 0 for n in numbers)
                and all(x is None or isinstance(x, (int, float)) for x in (progress.loss, progress.val_loss))
                and isinstance(progress.tokens_per_second, (int, float)) and isinstance(progress.training, bool)
                and isinstance(progress.group_key, str) and len(progress.group_key) <= 64
                and isinstance(progress.group, list) and len(progress.group) <= MAX_GROUP
                and all(isinstance(m, str) and len(m) <= 64 for m in progress.group)
                and isinstance(progress.final, str) and len(progress.final) <= 64
                and isinstance(progress.settled, bool)):
            raise ValueError("progress has a field of the wrong type")
        return progress


async def read_board(dht: RecordDHT, swarm: str, me: str = "", level: int | None = None) -> BucketRead[Progress]:
    """``me``'s bucket of the board at ``level`` (``dht.buckets.read_buckets``)."""
    return await read_buckets(dht, run_key(swarm), Progress.from_value, "run board entry", me=me, level=level)


def choose_run(board: list[Progress]) -> RunConfig:
    """The configuration most peers train (ties: the smaller run id), with a clear error when
    there is none or this peer cannot take part."""
    if not board:
        raise RunConfigError("no peer of this swarm publishes a training run yet; start one with --run or --seed")
    compatible = [p for p in board if p.protocol == PROTOCOL]
    if not compatible:
        protocols = sorted({p.protocol for p in board})
        raise RunConfigError(f"this swarm trains with run protocol {protocols}; this peer (protocol {PROTOCOL}) "
                             "cannot join it: upgrade or downgrade legion to a matching version")
    counts = Counter(p.run_id for p in compatible)
    run_id = min(counts, key=lambda r: (-counts[r], r))
    progress = next(p for p in compatible if p.run_id == run_id)
    config = RunConfig.from_dict(progress.config, f"the run published by {progress.peer_id}")
    if config.run_id != run_id:
        raise RunConfigError(f"the run published by {progress.peer_id} does not match its id")
    return config
