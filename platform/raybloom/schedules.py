"""Learning-rate schedules as pure functions of the epoch t (0-based).

`plateau` is a pure function of the validation-loss history seen before epoch t, `gradient` of the
gradient-norm history (the engine's `grad_norm` of each epoch), so neither needs hidden state and both
resume from a checkpoint by replaying the history.
"""

from __future__ import annotations

import math
from typing import Sequence

from raybloom.spec.sections import ScheduleSpec


def constant(lr0: float, t: int) -> float:
    return lr0


def time_decay(lr0: float, t: int, k: float) -> float:
    """lr0 / (1 + k·t)."""
    return lr0 / (1.0 + k * t)


def step_decay(lr0: float, t: int, step_size: int, gamma: float) -> float:
    """lr0 · gamma^floor(t / step_size)."""
    return lr0 * gamma ** (t // step_size)


def exponential(lr0: float, t: int, gamma: float) -> float:
    """lr0 · gamma^t."""
    return lr0 * gamma**t


def cosine(lr0: float, t: int, total: int, warmup: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up to lr0 over `warmup` epochs, then cosine decay to min_lr at the last epoch."""
    if t < warmup:
        return lr0 * (t + 1) / warmup
    span = max(total - warmup - 1, 1)
    progress = min((t - warmup) / span, 1.0)
    return min_lr + 0.5 * (lr0 - min_lr) * (1.0 + math.cos(math.pi * progress))


def plateau(lr0: float, val_history: Sequence[float], patience: int, factor: float, threshold: float = 1e-4) -> float:
    """Multiply by `factor` each time val_loss has not improved (relatively, by `threshold`) for `patience` epochs."""
    lr, best, wait = lr0, math.inf, 0
    for v in val_history:
        if v < best * (1.0 - threshold):
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                lr, wait = lr * factor, 0
    return lr


def gradient(lr0: float, grad_history: Sequence[float], min_lr: float = 0.0, power: float = 1.0) -> float:
    """lr0 · (g_last / g_0)^power, bounded to [min_lr, lr0]: the learning rate falls as the mean gradient norm
    of the last epoch falls below the first epoch's (lr0 until one epoch has been seen). A gradient norm that
    is not positive and finite (no steps, a zero gradient) leaves the floor or lr0: never NaN."""
    if len(grad_history) < 2 or not math.isfinite(grad_history[0]) or grad_history[0] <= 0:
        return lr0
    ratio = grad_history[-1] / grad_history[0]
    if not math.isfinite(ratio):
        return lr0
    return min(lr0, max(min_lr, lr0 * ratio ** power))


def lr_at(t: int, lr0: float, schedule: ScheduleSpec, total_epochs: int, val_history: Sequence[float] = (),
          grad_history: Sequence[float] = ()) -> float:
    """The learning rate of epoch t under a `ScheduleSpec`; val_history holds val_loss of epochs < t,
    grad_history the mean gradient norm (`grad_norm`) of epochs < t."""
    if schedule.name == "constant":
        return constant(lr0, t)
    if schedule.name == "time":
        return time_decay(lr0, t, schedule.decay)
    if schedule.name == "step":
        return step_decay(lr0, t, schedule.step_size, schedule.gamma)
    if schedule.name == "exponential":
        return exponential(lr0, t, schedule.gamma)
    if schedule.name == "cosine":
        return cosine(lr0, t, total_epochs, schedule.warmup_epochs, schedule.min_lr)
    if schedule.name == "plateau":
        return plateau(lr0, list(val_history)[:t], schedule.patience, schedule.factor, schedule.threshold)
    if schedule.name == "gradient":
        return gradient(lr0, list(grad_history)[:t], schedule.min_lr, schedule.power)
    raise ValueError(f"schedule.name: unknown schedule {schedule.name!r}")
