"""A learning-rate schedule that runs over the training minutes instead of the steps.

A run bounded by `max_minutes` does not know how many steps it will make, so the Trainer's
decaying schedules (cosine, linear), which are laid out over a step count, cannot end where the
run ends: runs on a clock train at a constant rate. With `lr_over_minutes` the decay follows the
share of the time budget used, read when the scheduler steps, and reaches its end (zero) as the
budget does. Warm-up stays in steps (`warmup_steps` ≥ 1) or, below 1, is that share of the minutes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

DECAYS: dict[str, Callable[[float], float]] = {
    "cosine": lambda done: 0.5 * (1.0 + math.cos(math.pi * done)),
    "linear": lambda done: 1.0 - done,
}


def minutes_schedule(kind: str, warmup_steps: float, fraction: Callable[[], float]) -> Callable[[int], float]:
    """→ the LambdaLR factor of an optimizer step: warm-up times the decay at the budget's share
    used. `fraction()` is that share, 0 before training starts; it is clamped to [0, 1]."""
    if kind not in DECAYS:
        raise ValueError(f"lr_over_minutes decays with {' or '.join(DECAYS)}, not {kind!r}")
    decay = DECAYS[kind]

    def factor(step: int) -> float:
        done = min(1.0, max(0.0, fraction()))
        if warmup_steps >= 1:
            warm = min(1.0, step / warmup_steps)
        else:
            warm = min(1.0, done / warmup_steps) if warmup_steps > 0 else 1.0
        return warm * decay(done)

    return factor
