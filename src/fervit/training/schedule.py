"""Learning-rate schedules: a multiplier of the base lr per optimiser step, driven by torch's LambdaLR.

A schedule is a callable object, so LambdaLR's state_dict carries its attributes and a resumed run
continues it exactly.
"""

from __future__ import annotations

import math


class WarmupCosine:
    """Linear warmup to 1, then cosine decay to min_ratio, as a multiplier of the base lr."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float):
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def replan(self, total_steps: int) -> None:
        """Finish the cosine after `total_steps` instead (the time budget): it continues from where it is,
        decaying faster."""
        self.total_steps = total_steps

    def epoch_end(self, val_acc: float) -> None:
        """Validation does not steer a cosine."""
