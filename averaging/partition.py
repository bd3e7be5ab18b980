"""How the flattened vector is split among a group's members."""

from __future__ import annotations

import math
import statistics

from averaging.codecs import BLOCK

MAX_WEIGHT = 1e6  # a weight (Mbit/s, say) beyond this is not believed
MAX_SHARE = 4.0  # a weight counts for at most this many times the median weight (capped_at_median)


def partition_bounds(total: int, weights: list[float]) -> list[int]:
    """Boundaries ``b`` (len = members + 1) splitting ``total`` values into parts proportional to
    ``weights`` (e.g. upload bandwidth), each boundary on a codec block. Weights that are not
    positive finite numbers up to ``MAX_WEIGHT`` count as the median of the others (or 1), and
    none counts for more than ``MAX_SHARE`` times that median."""
    known = [float(w) for w in weights if _usable(w)]
    fill = statistics.median(known) if known else 1.0
    # no member takes more than MAX_SHARE times the median's part, whatever it declares
    weights = capped_at_median([float(w) if _usable(w) else fill for w in weights])
    scale = total / sum(weights)
    bounds, acc = [0], 0.0
    for w in weights[:-1]:
        acc += w * scale
        bounds.append(min(total, max(bounds[-1], int(round(acc / BLOCK)) * BLOCK)))
    bounds.append(total)
    return bounds


def cell_bounds(total: int, cells: int) -> list[int]:
    """The boundaries of ``cells`` near-equal cells of ``total`` values, each on a codec block: the
    grid every group of a two-level round cuts its vector on, so that the owners of one cell in
    every group reduce the same values with each other (``averaging.allreduce.GroupSpec.cells``)."""
    return [min(total, int(round(i * total / cells / BLOCK)) * BLOCK) for i in range(cells)] + [total]


def cell_owner_bounds(total: int, cells: int, members: int) -> list[int]:
    """Part boundaries giving each of ``members`` whole cells of ``cell_bounds``, as evenly as
    they go (with more members than cells some own none)."""
    grid = cell_bounds(total, cells)
    return [grid[j * cells // members] for j in range(members)] + [total]


def capped_at_median(values: list[float], ratio: float = MAX_SHARE) -> list[float]:
    """``values`` (self-declared: bandwidths, capacities) each at most ``ratio`` times their
    median, so that no peer's claim alone can take everything."""
    limit = ratio * statistics.median(values)
    return [min(v, limit) for v in values]


def _usable(weight: object) -> bool:
    """A weight that is a positive, finite, believable number (remote peers declare them)."""
    return type(weight) in (int, float) and math.isfinite(weight) and 0 < weight <= MAX_WEIGHT
