"""One training epoch: the step (fervit.training.step.TrainStep) over batches drawn from the resident dataset."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fervit.errors import FervitError
from fervit.training.distributed import DistContext, all_reduce_sum


@dataclass
class EpochBatches:
    """Where an epoch's batches come from: the dataset on the training device and the draw over it."""

    images: torch.Tensor  # (N, 48, 48) uint8 on the training device
    labels: torch.Tensor  # (N,)
    train_idx: torch.Tensor  # the indices an epoch draws from
    gen: torch.Generator  # shuffling and augmentation; on the training device
    sample_weights: torch.Tensor | None = None  # per training example, for a balanced draw
    # self-distillation (optim.self_distill): each image's predicted probabilities when it was last trained on
    # (its one-hot label before that), indexed like `images`, and this epoch's weight of them in the target
    soft: torch.Tensor | None = None  # (N, classes) float32
    soft_weight: float = 0.0


def check_self_distill(cfg, world_size: int) -> None:
    """One-line errors for self-distillation where it cannot work, before any data is read."""
    if cfg.optim.self_distill > 0 and (cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0):
        raise FervitError("optim.self_distill keeps one prediction per training image, which a mixed image is not; "
                          "turn off augment.mixup_alpha and augment.cutmix_alpha, or set optim.self_distill=0")
    if cfg.optim.self_distill > 0 and world_size > 1:
        raise FervitError("optim.self_distill trains in one process only (each rank sees only its slice of the "
                          "predictions); run it without torchrun/srun")


def first_soft_targets(labels: torch.Tensor, cfg, log) -> torch.Tensor | None:
    """EpochBatches.soft before the first epoch (every image's one-hot label), or None without self-distillation."""
    if cfg.optim.self_distill <= 0:
        return None
    log(f"self-distillation: targets mix in each image's prediction of the epoch before, weight 0 rising to "
        f"{cfg.optim.self_distill} (optim.self_distill)")
    return F.one_hot(labels, cfg.model.num_classes).float()


def self_distill_weight(final: float, epoch: int, epochs: int) -> float:
    """PS-KD's linear ramp (Kim et al., ICCV 2021): 0 in epoch 1, which has no predictions yet, `final` in the
    last of `epochs`."""
    return final * (epoch - 1) / max(epochs - 1, 1)


def train_one_epoch(step, batches: EpochBatches, bar=None, ctx: DistContext | None = None) -> dict:
    """One pass of `step` (a TrainStep) over a fresh permutation (or balanced draw) of the training indices;
    metrics stay on device.

    Under DDP (`ctx`) every rank draws the same permutation and augments the whole global batch, so the shared
    generator stays in lockstep and the recipe is the single-process one; each rank then trains on its
    slice, and the returned metrics are summed over ranks.
    """
    step.model.train()
    device = batches.images.device
    order = epoch_order(batches)
    bs = step.cfg.train.batch_size
    n = len(order)
    # drop the last partial batch: equal shapes keep compiled graphs static, and the order is fresh each epoch
    n_used = n if n <= bs else n - n % bs
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for i, start in enumerate(range(0, n_used, bs)):
        idx = order[start:start + bs]
        y = batches.labels[idx]
        target = None
        if batches.soft is not None and batches.soft_weight > 0:
            target = torch.lerp(F.one_hot(y, batches.soft.shape[1]).float(), batches.soft[idx], batches.soft_weight)
        loss, batch_correct = step(batches.images[idx], y, batches.gen, target=target)
        if batches.soft is not None:
            batches.soft[idx] = step.logits.float().softmax(-1)
        loss_sum += loss * len(idx)
        correct += batch_correct
        if bar is not None:
            bar.update(len(idx))
            if device.type == "cpu" and ctx is None and i % 10 == 0:  # a cheap read on CPU; on GPU per epoch
                seen = start + len(idx)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{float(correct) / seen:.3f}")
    if ctx is not None and ctx.world_size > 1:
        totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double()]), ctx)
        loss_sum, correct = totals[0], totals[1]
    return {"loss": float(loss_sum) / n_used, "acc": float(correct) / n_used}


def epoch_order(batches: EpochBatches) -> torch.Tensor:
    """This epoch's training examples in order: a permutation, or a class-balanced draw with replacement."""
    n = len(batches.train_idx)
    if batches.sample_weights is not None:
        return batches.train_idx[torch.multinomial(batches.sample_weights, n, replacement=True, generator=batches.gen)]
    return batches.train_idx[torch.randperm(n, generator=batches.gen, device=batches.images.device)]
