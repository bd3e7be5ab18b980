"""The stable split of a run's flattened parameter vector into shards."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardLayout:
    """``count`` contiguous shards of ``total`` values; sizes differ by at most one."""

    total: int
    count: int

    def __post_init__(self) -> None:
        if self.total < 1 or not 1 <= self.count <= self.total:
            raise ValueError(f"cannot split {self.total} values into {self.count} shards")

    def bounds(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.count:
            raise IndexError(f"shard {shard} of {self.count}")
        return shard * self.total // self.count, (shard + 1) * self.total // self.count

    def size(self, shard: int) -> int:
        start, end = self.bounds(shard)
        return end - start
