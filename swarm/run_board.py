"""The run board: where every training peer publishes its progress (run id, round, loss,
throughput, traffic). Peers read it to learn what to train, how many peers to expect in a round,
which round the swarm is in, and whom to fetch the state from. In a swarm of more than 64 peers
each peer reads only its bucket of the board, which also estimates the swarm's size
(``dht.buckets``). A run's configuration does not change: it is under a key of its own, written
by about ``RUN_CONFIG_WRITERS`` of the peers training it, not in every board entry (a kilobyte
each, read by every peer every heartbeat)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

from dht import RecordDHT
from dht.buckets import BucketPlace, BucketRead, bucket_prefix
from swarm.run_config import PROTOCOL, RunConfig, RunConfigError

log = logging.getLogger(__name__)


MAX_GROUP = 64  # members of a published group (a round's group is at most RunConfig.group_size)
RUN_CONFIG_WRITERS = 16  # peers of a run that publish its configuration, about
RUN_CONFIG_HEARTBEATS = 12  # the lifetime of a published configuration (refreshed at a third of it)


def run_key(swarm: str) -> str:
    """The run board's key (split into buckets in a large swarm: ``dht.buckets``)."""
    return f"/legion/{swarm}/run"


def run_configs_key(swarm: str) -> str:
    return f"/legion/{swarm}/runs"


def publishes_config(peer_id: str, swarm_size: int) -> bool:
    """Whether ``peer_id`` is one of the about ``RUN_CONFIG_WRITERS`` peers of a swarm of
    ``swarm_size`` that publish their run's configuration (all of a small swarm)."""
    return swarm_size <= RUN_CONFIG_WRITERS or bucket_prefix(peer_id, 32) * swarm_size < RUN_CONFIG_WRITERS << 32


async def read_run_configs(dht: RecordDHT, swarm: str) -> dict[str, RunConfig]:
    """The runs' configurations published, by run id (a configuration names itself: its id is a
    hash of it, so a peer cannot publish another configuration under a run's id)."""
    configs = {}
    for peer_id, value in await dht.get_parsed(run_configs_key(swarm), lambda peer, v: (peer, v), "run configuration"):
        try:
            config = RunConfig.from_dict(value, f"the run configuration of {peer_id}")
        except ValueError as exc:
            log.warning("ignoring %s", exc)
            continue
        configs[config.run_id] = config
    return configs


@dataclass
class Progress:
    run_id: str
    protocol: int
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
    group: list[str] = field(default_factory=list)  # ...and its contributors (from the group's first member only)
    base: str = ""  # "ROUND:DIGEST": its swarm weights' digest at its round (DiLoCo: swarm.final_weights.outnumbering)
    final: str = ""  # once finished: the digest of its final weights (swarm.final_weights)...
    settled: bool = False  # ...and whether they are the ones it leaves with
    peer_id: str = field(default="", compare=False)

    def show_weights(self, round_: int, digest: str) -> None:
        """Show the digest of this peer's swarm weights at ``round_`` (``base``): one string, so
        that a board write from another thread never pairs a round with another round's digest."""
        self.base = f"{round_}:{digest}"

    def weights_shown(self) -> tuple[int, str] | None:
        """The round and weights' digest ``base`` shows, or None (none shown, or malformed)."""
        round_text, _, digest = self.base.partition(":")
        return (int(round_text), digest) if digest and round_text.isdigit() else None

    def to_value(self) -> dict:
        """The board entry: short names, fields at their default left out (since run protocol 5;
        the field names were two thirds of an entry, read by every peer of its bucket)."""
        defaults = Progress("", 0)
        return {WIRE_NAMES[name]: value for name, value in asdict(self).items()
                if name in ("run_id", "protocol") or (name != "peer_id" and value != getattr(defaults, name))}

    @classmethod
    def from_value(cls, peer_id: str, value) -> "Progress":
        """Parse a board entry (of run protocol 5, or older with field names, so that a joiner can
        say which protocol the swarm trains with); raises ``ValueError`` for anything malformed."""
        if not isinstance(value, dict):
            raise ValueError("progress is not a map")
        if "run_id" in value:  # run protocol 4 or older (3 carried the configuration too)
            value = {k: v for k, v in value.items() if k != "config"}
        else:
            try:
                value = {FIELD_NAMES[k]: v for k, v in value.items()}
            except (KeyError, TypeError) as exc:
                raise ValueError(f"progress has an unknown field {exc}") from exc
        try:
            progress = cls(**value, peer_id=peer_id)
        except TypeError as exc:
            raise ValueError(f"progress has unexpected fields: {exc}") from exc
        numbers = (progress.step, progress.samples, progress.bytes_sent, progress.bytes_received, progress.group_size,
                   progress.rounds_averaged, progress.rounds_alone, progress.rounds_failed)
        if not (isinstance(progress.run_id, str) and len(progress.run_id) <= 64
                and isinstance(progress.round, int) and isinstance(progress.protocol, int)
                and all(isinstance(n, int) and n >= 0 for n in numbers)
                and all(x is None or isinstance(x, (int, float)) for x in (progress.loss, progress.val_loss))
                and isinstance(progress.tokens_per_second, (int, float)) and isinstance(progress.training, bool)
                and isinstance(progress.group_key, str) and len(progress.group_key) <= 64
                and isinstance(progress.group, list) and len(progress.group) <= MAX_GROUP
                and all(isinstance(m, str) and len(m) <= 64 for m in progress.group)
                and isinstance(progress.base, str) and len(progress.base) <= 64
                and isinstance(progress.final, str) and len(progress.final) <= 64
                and isinstance(progress.settled, bool)):
            raise ValueError("progress has a field of the wrong type")
        return progress


# each field's name on the wire (run protocol 5)
WIRE_NAMES = {"run_id": "id", "protocol": "p", "round": "r", "step": "s", "samples": "n", "loss": "l",
              "val_loss": "v", "tokens_per_second": "t", "bytes_sent": "bs", "bytes_received": "br",
              "group_size": "g", "training": "T", "rounds_averaged": "ra", "rounds_alone": "rl",
              "rounds_failed": "rf", "group_key": "gk", "group": "gm", "base": "b", "final": "f", "settled": "S"}
FIELD_NAMES = {wire: name for name, wire in WIRE_NAMES.items()}


def board_place(swarm: str, me: str = "") -> BucketPlace[Progress]:
    """``me``'s place on the run board, kept from read to read (a random bucket without ``me``)."""
    return BucketPlace(run_key(swarm), Progress.from_value, "run board entry", me)


async def read_board(dht: RecordDHT, swarm: str, me: str = "") -> BucketRead[Progress]:
    """``me``'s bucket of the board, read once (its level found first)."""
    return await board_place(swarm, me).read(dht)


def choose_run(board: list[Progress], configs: dict[str, RunConfig]) -> RunConfig | None:
    """The configuration of the run most peers train (ties: the smaller run id), None while its
    configuration is not read yet, with a clear error when there is no run or this peer cannot
    take part."""
    if not board:
        raise RunConfigError("no peer of this swarm publishes a training run yet; start one with --run or --seed")
    compatible = [p for p in board if p.protocol == PROTOCOL]
    if not compatible:
        protocols = sorted({p.protocol for p in board})
        raise RunConfigError(f"this swarm trains with run protocol {protocols}; this peer (protocol {PROTOCOL}) "
                             "cannot join it: upgrade or downgrade legion to a matching version")
    counts = Counter(p.run_id for p in compatible)
    return configs.get(min(counts, key=lambda r: (-counts[r], r)))
