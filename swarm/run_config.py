"""A training run's configuration: what model, data, algorithm and hyperparameters a swarm trains.

It is given to the first peer (``--run CONFIG.toml`` or flags) and published in the DHT by a few of
the peers training it (``swarm.run_board``), so a peer started with only ``--bootstrap`` learns
what to train."""

from __future__ import annotations

import hashlib
import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import msgpack

from averaging.codecs import CodecError, get_codec
from optim.model_config import SIZES, GPTConfig
from optim.schedule import SCHEDULES

PROTOCOL = 9  # bumped whenever peers of different versions could not train together (2: sharded rounds;
# 3: run board entries carry round counts and the last group, which older peers reject; 4: the run's
# configuration under its own key, not in every board entry; 5: board entries with short field names;
# 6: sharded momentum asked for by the weights it belongs to; 7: board entries carry the weights' digest;
# 8: sharded rounds of several groups reduce each shard across the groups; 9: a round's matchmaking
# keys held at the nodes of its rotation's keys, ``groups.rotation_of``)
ALGORITHMS = ("diloco", "sync", "onebit-adam")
DEFAULT_CODECS = {"diloco": "int8", "sync": "none", "onebit-adam": "sign1"}


# The range of every number of a run (the model's sizes are bounded by GPTConfig.validate)
BOUNDS: dict[str, tuple[float, float]] = {
    "batch_size": (1, 4096), "accumulate": (1, 1024), "inner_steps": (1, 100_000), "inner_lr": (0, 10.0),
    "weight_decay": (0, 10.0), "outer_lr": (0, 10.0), "warmup_steps": (0, 1_000_000),
    "rounds": (0, 1 << 40), "seed": (0, (1 << 63) - 1), "eval_batches": (1, 1000), "group_size": (2, 64),
    "round_timeout": (1, 3600.0), "shards": (1, 4096), "replicas": (1, 8),
}


class RunConfigError(ValueError):
    """A run configuration that is invalid or incompatible with this peer."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    model: str = "tiny"
    n_layer: int = 0  # 0: the named size's value
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 0
    vocab_size: int = 256
    data: str = ""  # empty: the Python standard library corpus
    algorithm: str = "diloco"
    batch_size: int = 16
    accumulate: int = 1  # micro-batches of batch_size per local step
    inner_steps: int = 50
    inner_lr: float = 2e-3
    lr_schedule: str = "constant"  # or "cosine": to a tenth of inner_lr by the last round (runs with rounds > 0)
    weight_decay: float = 0.1
    outer_lr: float = 1.0
    outer_momentum: float = 0.0  # measured better than the DiLoCo paper's 0.9 for runs of tens of rounds (docs/benchmarks.md, Convergence)
    codec: str = ""  # empty: the algorithm's default (DEFAULT_CODECS)
    overlap: bool = True
    warmup_steps: int = 50
    rounds: int = 0  # 0: train until stopped
    seed: int = 0
    eval_batches: int = 8
    group_size: int = 16
    round_timeout: float = 60.0
    sharded: bool = False  # DiLoCo: the outer momentum held only by each shard's owners
    shards: int = 16  # the flattened parameters split into this many shards for ownership
    replicas: int = 2  # owners per shard

    def __post_init__(self) -> None:
        # 10 and 10.0 pack apart: a configuration made in Python with an int where a float is due
        # named another run than the same configuration read back from the DHT (floats), and a peer
        # joining from the network waited for that run's configuration for ever
        for f in fields(self):
            value = getattr(self, f.name)
            if type(f.default) is float and type(value) is int:
                object.__setattr__(self, f.name, float(value))

    def model_config(self) -> GPTConfig:
        base = SIZES[self.model]
        return GPTConfig(n_layer=self.n_layer or base.n_layer, n_head=self.n_head or base.n_head,
                         n_embd=self.n_embd or base.n_embd, block_size=self.block_size or base.block_size,
                         vocab_size=self.vocab_size)

    def validate(self) -> "RunConfig":
        if self.model not in SIZES:
            raise RunConfigError(f"model {self.model!r} is not one of {', '.join(SIZES)}")
        if self.algorithm not in ALGORITHMS:
            raise RunConfigError(f"algorithm {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        try:
            self.model_config().validate()
            get_codec(self.averaging_codec)
        except (ValueError, CodecError) as exc:
            raise RunConfigError(str(exc)) from exc
        positive = {"batch_size": self.batch_size, "accumulate": self.accumulate, "inner_steps": self.inner_steps, "inner_lr": self.inner_lr,
                    "outer_lr": self.outer_lr, "eval_batches": self.eval_batches, "round_timeout": self.round_timeout}
        for name, value in positive.items():
            if not value > 0:
                raise RunConfigError(f"{name} must be positive, not {value}")
        for name, (low, high) in BOUNDS.items():  # a configuration may come from any peer: every number bounded
            value = getattr(self, name)
            if not low <= value <= high:
                raise RunConfigError(f"{name} = {value} outside [{low:g}, {high:g}]")
        if not 0 <= self.outer_momentum < 1 or self.weight_decay < 0 or self.rounds < 0 or self.warmup_steps < 0:
            raise RunConfigError("outer_momentum must lie in [0, 1); weight_decay, rounds, warmup_steps >= 0")
        if self.lr_schedule not in SCHEDULES:
            raise RunConfigError(f"lr_schedule {self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.lr_schedule != "constant" and not self.rounds:
            raise RunConfigError(f"lr_schedule {self.lr_schedule!r} needs the run's length: set rounds")
        if self.sharded and self.algorithm != "diloco":
            raise RunConfigError("sharded runs are DiLoCo runs (the outer optimizer's state is what is sharded)")
        if self.shards > self.model_config().num_params():
            raise RunConfigError(f"{self.shards} shards for {self.model_config().num_params()} parameters")
        if not self.name.replace("-", "").replace("_", "").isalnum() or len(self.name) > 64:
            raise RunConfigError(f"run name {self.name!r} must be 1-64 letters, digits, - or _")
        return self

    @property
    def averaging_codec(self) -> str:
        return self.codec or DEFAULT_CODECS[self.algorithm]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str) -> "RunConfig":
        if not isinstance(values, dict):
            raise RunConfigError(f"{source}: a run configuration is a table of keys")
        known = {f.name: f for f in fields(cls)}
        if not all(isinstance(key, str) for key in values):
            raise RunConfigError(f"{source}: a run configuration's keys are names")
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise RunConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        typed = {}
        for key, value in values.items():
            want = type(getattr(cls(), key))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not want:
                raise RunConfigError(f"{source}: {key} = {value!r:.60} should be a {want.__name__}")
            if want is float and not math.isfinite(value):
                raise RunConfigError(f"{source}: {key} = {value} is not a finite number")
            if want is str and len(value) > 4096:
                raise RunConfigError(f"{source}: {key} is longer than 4096 characters")
            typed[key] = value
        return cls(**typed).validate()

    @property
    def run_id(self) -> str:
        """Names the run: peers only average with peers of the same run id."""
        packed = msgpack.packb([PROTOCOL, sorted(self.to_dict().items())], use_bin_type=True)
        return hashlib.sha256(packed).hexdigest()[:16]

    def with_overrides(self, **values) -> "RunConfig":
        return replace(self, **{k: v for k, v in values.items() if v is not None}).validate()


def load_run_file(path: Path) -> RunConfig:
    try:
        values = tomllib.loads(path.read_text())
    except OSError as exc:
        raise RunConfigError(f"--run {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RunConfigError(f"--run {path}: not valid TOML: {exc}") from exc
    return RunConfig.from_dict(values, str(path))
