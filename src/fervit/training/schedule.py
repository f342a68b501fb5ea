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
        """Finish the cosine after `total_steps` instead (the time budget, or --epochs on resume): from the step
        reached on, the values are those of the cosine planned for `total_steps` from the start, so a shorter plan
        decays faster and a longer one takes the rate back up to that cosine's value at this step."""
        self.total_steps = total_steps

    def epoch_end(self, val_acc: float) -> bool:
        """Validation does not steer a cosine: the rate never jumps."""
        return False


class WarmupPlateau:
    """Linear warmup to 1, then the rate is multiplied by `factor` each time validation accuracy has not
    improved for `patience` epochs, never below min_ratio (the recipe of the published FER-2013 CNNs)."""

    def __init__(self, warmup_steps: int, factor: float, patience: int, min_ratio: float):
        self.warmup_steps, self.factor, self.patience, self.min_ratio = warmup_steps, factor, patience, min_ratio
        self.scale, self.best, self.stale = 1.0, -1.0, 0  # the state; LambdaLR's state_dict carries it

    def __call__(self, step: int) -> float:
        return min((step + 1) / max(self.warmup_steps, 1), 1.0) * self.scale

    def replan(self, total_steps: int) -> None:
        """A plateau schedule does not depend on the run's length."""

    def epoch_end(self, val_acc: float) -> bool:
        """Count an epoch; True when the rate dropped."""
        if val_acc > self.best:
            self.best, self.stale = val_acc, 0
            return False
        self.stale += 1
        if self.stale < self.patience or self.scale <= self.min_ratio:
            return False
        self.scale, self.stale = max(self.scale * self.factor, self.min_ratio), 0
        return True


def build_schedule(optim, steps_per_epoch: int, epochs: int) -> WarmupCosine | WarmupPlateau:
    """The lr multiplier per step that `optim` (an OptimConfig) asks for."""
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    if optim.schedule == "plateau":
        return WarmupPlateau(warmup, optim.plateau_factor, optim.plateau_patience, optim.min_lr_ratio)
    return WarmupCosine(steps_per_epoch * epochs, warmup, optim.min_lr_ratio)


def apply_now(scheduler) -> None:
    """Set the optimiser's lr from the schedule at the current step: a plateau drop takes effect on the very
    next step, not one step late (LambdaLR computed that step's lr before the epoch ended)."""
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
