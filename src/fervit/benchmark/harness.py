"""How the bench drives fervit's training step: phase by phase under the profiler, for a whole epoch, and the
optimiser step of the usual training loop it is compared against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fervit.config import RunConfig
from fervit.training import epoch
from fervit.training.step import TrainStep


class PhasedTrainStep(TrainStep):
    """A TrainStep whose phases each run in their own torch.profiler range while `profile_phases` is set."""

    profile_phases = False

    def __call__(self, images_u8: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        if not self.profile_phases:
            return self.run_phases(images_u8, y, gen)
        return self.run_phases(images_u8, y, gen, phase=torch.profiler.record_function)


@dataclass
class EpochParts:
    """One epoch of fervit's own training on `train_idx`: the step is built for each epoch, as the trainer
    builds it once per run."""

    cfg: RunConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    images: torch.Tensor
    labels: torch.Tensor
    train_idx: torch.Tensor
    gen: torch.Generator
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False


def train_one_epoch(p: EpochParts) -> dict:
    step = TrainStep(p.model, p.optimizer, p.scheduler, p.cfg, amp_dtype=p.amp_dtype, channels_last=p.channels_last)
    return epoch.train_one_epoch(step, epoch.EpochBatches(p.images, p.labels, p.train_idx, p.gen))


def optimizer_step(objective: torch.Tensor, model: nn.Module, optimizer, scheduler, grad_clip: float) -> None:
    """The usual loop's step: backward, optional gradient clipping, one optimiser and one schedule step."""
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
