"""How fast to step and when to stop: learning-rate schedules and early stopping for `optimize`.

A schedule is a callable `step -> factor` (step counted from 0) that multiplies Adam's learning
rate; `EarlyStop` decides from each image's own objective history when that image has stopped
rising, so `optimize` can drop it from the batch and spend the steps on the others.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

Schedule = Callable[[int], float]


def constant() -> Schedule:
    """The same learning rate at every step."""
    return lambda step: 1.0


def warmup_cosine(steps: int, warmup: int = 0, floor: float = 0.0) -> Schedule:
    """A linear warm-up over `warmup` steps from lr / warmup to lr, then a half cosine from lr down
    to floor * lr at the last step.

    The warm-up keeps Adam's first, badly normalised steps small; the decay lets the image settle
    at the end instead of jumping around the optimum by a constant step, which the final
    evaluation (no transforms) would see as noise.

    Args:
        steps: total steps (the schedule reaches its floor at step steps - 1).
        warmup: warm-up steps, 0 <= warmup < steps; default 0.
        floor: the last step's factor, in [0, 1]; default 0.
    """
    if steps < 1 or not 0 <= warmup < steps or not 0 <= floor <= 1:
        raise ValueError(f"need steps >= 1, 0 <= warmup < steps and floor in [0, 1]; got {steps}, {warmup}, {floor}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, steps - 1 - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclasses.dataclass(frozen=True)
class EarlyStop:
    """Stops an image once its objective has stopped rising.

    The objective of one step is noisy (every step sees new random transforms), so rises are
    measured between window means: at step t (t >= 2 * window), with a = the mean objective over
    steps [t - 2w, t - w) and b = the mean over [t - w, t), the image stops when
    (b - a) / max(|b|, 1e-8) < min_rise. An image whose objective still rises by at least
    min_rise (relative) per window is never stopped; none stops before 2 * window steps.

    Attributes:
        window: steps per window, >= 1.
        min_rise: the relative rise per window below which an image stops, >= 0.
        min_steps: no image stops before this step; default 0 (then 2 * window rules).
    """

    window: int
    min_rise: float
    min_steps: int = 0

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_rise < 0 or self.min_steps < 0:
            raise ValueError(f"EarlyStop needs window >= 1, min_rise >= 0 and min_steps >= 0; got {self}")

    def rise(self, history: torch.Tensor) -> torch.Tensor:
        """(B,) relative rise of the last window's mean objective over the window before, from a
        (t, B) history of per-image objectives (NaN where t < 2 * window)."""
        w = self.window
        if history.shape[0] < 2 * w:
            return torch.full(history.shape[1:], float("nan"), dtype=torch.float64)
        h = history.to(torch.float64)
        before = h[-2 * w:-w].mean(dim=0)
        recent = h[-w:].mean(dim=0)
        return (recent - before) / recent.abs().clamp_min(1e-8)

    def stalled(self, history: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which images of a (t, B) history have stopped rising (see the class)."""
        rise = self.rise(history)
        if history.shape[0] < max(2 * self.window, self.min_steps):
            return torch.zeros(history.shape[1:], dtype=torch.bool)
        return rise < self.min_rise
