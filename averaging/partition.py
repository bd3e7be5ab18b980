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


def capped_at_median(values: list[float], ratio: float = MAX_SHARE) -> list[float]:
    """``values`` (self-declared: bandwidths, capacities) each at most ``ratio`` times their
    median, so that no peer's claim alone can take everything."""
    limit = ratio * statistics.median(values)
    return [min(v, limit) for v in values]


def _usable(weight: object) -> bool:
    """A weight that is a positive, finite, believable number (remote peers declare them)."""
    return type(weight) in (int, float) and math.isfinite(weight) and 0 < weight <= MAX_WEIGHT
