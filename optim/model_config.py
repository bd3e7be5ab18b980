"""GPT shapes and their named sizes: plain data, importable without torch (the CLI and run
configurations need them at start-up)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


MAX_PARAMS = 2_000_000_000  # a run configuration read from the network is believed up to this size


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int = 256

    def validate(self) -> None:
        if min(self.n_layer, self.n_head, self.n_embd, self.block_size, self.vocab_size) < 1:
            raise ValueError(f"model sizes must be positive: {self}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.vocab_size > 65536:
            raise ValueError("vocab_size above 65536 does not fit uint16 token files")
        for name, value, limit in (("n_layer", self.n_layer, 256), ("n_head", self.n_head, 256),
                                   ("n_embd", self.n_embd, 16384), ("block_size", self.block_size, 16384)):
            if value > limit:
                raise ValueError(f"{name} {value} is above {limit}")
        if self.num_params() > MAX_PARAMS:
            raise ValueError(f"{self.num_params():,} parameters: above the {MAX_PARAMS:,} a peer takes")

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        """Trainable parameters of ``optim.model.GPT`` with this shape (tied embeddings)."""
        e = self.n_embd
        return self.n_layer * (12 * e * e + 13 * e) + (self.vocab_size + self.block_size) * e + 2 * e


# Parameter counts are for the byte-level vocabulary (256); "gpt2" with vocab_size=50257 is GPT-2 small (124M).
SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64),      # 0.8M
    "mini": GPTConfig(n_layer=6, n_head=6, n_embd=192, block_size=128),     # 2.7M
    "small": GPTConfig(n_layer=8, n_head=8, n_embd=384, block_size=256),    # 14M
    "medium": GPTConfig(n_layer=12, n_head=8, n_embd=512, block_size=512),   # 38M
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),   # 85M (124M at vocab 50257)
}
