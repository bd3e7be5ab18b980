"""How the flattened vector is split among a group's members."""

from __future__ import annotations

from averaging.codecs import BLOCK


def partition_bounds(total: int, weights: list[float]) -> list[int]:
    """Boundaries ``b`` (len = members + 1) splitting ``total`` values into parts proportional to
    ``weights`` (e.g. upload bandwidth), each boundary on a codec block. Non-positive or unknown
    weights count as the mean of the others (or 1)."""
    known = [w for w in weights if w and w > 0]
    fill = sum(known) / len(known) if known else 1.0
    weights = [w if w and w > 0 else fill for w in weights]
    scale = total / sum(weights)
    bounds, acc = [0], 0.0
    for w in weights[:-1]:
        acc += w * scale
        bounds.append(min(total, max(bounds[-1], int(round(acc / BLOCK)) * BLOCK)))
    bounds.append(total)
    return bounds
