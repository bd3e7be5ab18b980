"""The inner learning rate over a run: constant, or a cosine decay to a tenth of it by the last round.

Progress through the run is counted in swarm rounds, which every peer agrees on, so a peer that
joins late uses the learning rate the others use at that point.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")
COSINE_FLOOR = 0.1  # the decayed rate at the end of the run, relative to the base rate


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rate ``progress`` (0 to 1) of the way through a run."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(max(progress, 0.0), 1.0)
        return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"lr schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
