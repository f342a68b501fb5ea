"""Knowledge distillation: the teachers a student learns from beside its labels (`optim.distill_from`).

An ensemble of two fervit models scored 1.4-2.0 points above its members on FER-2013 (RESULTS.md), and
a single model distilled from it keeps much of that gain at one model's inference cost (Hinton et al., 2015).
Each training batch, after augmentation and mixing, goes through every teacher too (no gradients, the
student's precision and layout); their softened probabilities, averaged, are the target of a second term:

    loss = (1 - w) * CE(student, labels) + w * T^2 * KL(mean_k softmax(teacher_k / T) || softmax(student / T))

with w = `optim.distill_weight` and T = `optim.distill_temperature` (T^2 keeps the term's gradient on the
labels' scale as T changes). Teachers are read from their model files again on resume, so a run
resumes exactly as long as those files are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fervit.config import RunConfig
from fervit.data.dataset import CLASSES
from fervit.device import autocast
from fervit.errors import FervitError
from fervit.model_file import find_checkpoint
from fervit.models.checkpoint import load_model


class Teachers:
    """`teachers(x) -> (B, C)`: the mean of the teachers' softmax(logits / T) on a training batch."""

    def __init__(self, models: list[nn.Module], temperature: float, amp_dtype: torch.dtype | None):
        self.models, self.temperature, self.amp_dtype = models, temperature, amp_dtype

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.amp_dtype):
            logits = [m(x).float() for m in self.models]
        return torch.stack([F.softmax(z / self.temperature, -1) for z in logits]).mean(0)


def check_teachers(cfg: RunConfig) -> None:
    """One-line errors, before any data is read, for teachers that do not exist or are not model files."""
    for path in cfg.optim.distill_from:
        find_checkpoint(path)


def load_teachers(cfg: RunConfig, device: torch.device, channels_last: bool,
                  amp_dtype: torch.dtype | None, log=lambda *a: None) -> Teachers | None:
    """The run's teachers in eval mode on `device` (`log` names them), or None without `optim.distill_from`."""
    if not cfg.optim.distill_from:
        return None
    side = cfg.model.trained_side()  # what the student is fed, so what the teachers get
    models = []
    for path in cfg.optim.distill_from:
        model, meta = load_model(path, device)
        teacher_side = meta.model.trained_side()
        if teacher_side != side:
            raise FervitError(f"teacher '{path}' takes {teacher_side}px faces but this run trains on {side}px "
                              f"{'crops' if cfg.model.crop_size else 'faces'}; distil from teachers with the same "
                              "input (model.crop_size)")
        if list(meta.classes) != list(CLASSES):  # the soft targets are read class by class
            raise FervitError(f"teacher '{path}' predicts {', '.join(meta.classes)}; a fervit student learns "
                              f"{', '.join(CLASSES)}, in that order")
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        models.append(model.requires_grad_(False))
    log(f"distilling from {len(models)} teacher(s) (optim.distill_weight {cfg.optim.distill_weight}, "
        f"temperature {cfg.optim.distill_temperature}): {', '.join(cfg.optim.distill_from)}")
    return Teachers(models, cfg.optim.distill_temperature, amp_dtype)


def distillation_loss(logits: torch.Tensor, soft: torch.Tensor, temperature: float, count: int) -> torch.Tensor:
    """T^2 * KL(soft || softmax(logits / T)), summed over the batch and divided by `count` (the global batch
    size: under DDP each rank's share adds up to the whole batch's mean). Computed as the cross-entropy less
    the teachers' entropy, so that the logged loss is 0 where the student agrees with its teachers."""
    entropy = -(soft * soft.clamp_min(1e-12).log()).sum()
    return (F.cross_entropy(logits / temperature, soft, reduction="sum") - entropy) * temperature ** 2 / count
