"""One training epoch: the step (fervit.training.step.TrainStep) over batches drawn from the resident dataset."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fervit.training.distributed import DistContext, all_reduce_sum


@dataclass
class EpochBatches:
    """Where an epoch's batches come from: the dataset on the training device and the draw over it."""

    images: torch.Tensor  # (N, 48, 48) uint8 on the training device
    labels: torch.Tensor  # (N,)
    train_idx: torch.Tensor  # the indices an epoch draws from
    gen: torch.Generator  # shuffling and augmentation; on the training device
    sample_weights: torch.Tensor | None = None  # per training example, for a balanced draw


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
        loss, batch_correct = step(batches.images[idx], batches.labels[idx], batches.gen)
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
