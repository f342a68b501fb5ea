"""How the bench drives fervit's training step: phase by phase under the profiler, and the optimiser step of the
usual training loop it is compared against."""

from __future__ import annotations

import torch
import torch.nn as nn

from fervit.training.step import TrainStep


class PhasedTrainStep(TrainStep):
    """A TrainStep whose phases each run in their own torch.profiler range while `profile_phases` is set."""

    profile_phases = False

    def __call__(self, images_u8: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                 target: torch.Tensor | None = None):
        if not self.profile_phases:
            return self.run_phases(images_u8, y, gen, target=target)
        return self.run_phases(images_u8, y, gen, phase=torch.profiler.record_function, target=target)


def optimizer_step(objective: torch.Tensor, model: nn.Module, optimizer, scheduler, grad_clip: float) -> None:
    """The usual loop's step: backward, optional gradient clipping, one optimiser and one schedule step."""
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
