"""Learning rate as a pure function of the optimizer step: resume needs no scheduler state."""

import math


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps to `peak`, then cosine decay to `peak * min_ratio` at `total`.

    `step` counts from 0 (the first optimizer step uses lr_at(0)).
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (min_ratio + (1.0 - min_ratio) * cosine)
