"""One training epoch: `train_one_epoch` over an `EpochParts`, and the pieces it is built from."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fervit.config import RunConfig
from fervit.models.registry import no_weight_decay_names
from fervit.training.distributed import DistContext, all_reduce_sum


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced dataset gets weight 1 everywhere."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimiser groups: weight decay on weights; none on biases, norms (every tensor under 2-d) and
    the parameters the model names in `no_weight_decay()` (e.g. the [CLS] token, positional embeddings)."""
    exempt = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD with (Nesterov) momentum, over `parameter_groups`: fused on CUDA, foreach on a CPU.

    On a CPU torch's default is the per-parameter loop: 19 ms an AdamW step for the `cpu` preset's 1.9M
    parameters, 11 ms foreach. Not fused there (4 ms): with channels_last weights a resumed run's optimiser
    state comes back contiguous, and the fused CPU kernel then no longer reproduces the unbroken run.
    """
    o = cfg.optim
    groups = parameter_groups(model, o.weight_decay)
    fused = device.type == "cuda"
    kind = {"fused": True} if fused else {"foreach": True}
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, **kind)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, **kind)


def build_ema(model: nn.Module, cfg: RunConfig) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights (and buffers), or None when optim.ema_decay is 0.
    Its update count (`n_averaged`) is a buffer, so a resumed run continues the decay warm-up exactly."""
    if cfg.optim.ema_decay <= 0:
        return None
    update = (ema_warmup_update(cfg.optim.ema_decay) if cfg.optim.ema_warmup
              else torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema_decay))
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def ema_warmup_decay(n, decay: float):
    """The decay at the EMA's n-th update: (1 + n) / (10 + n), capped at `decay`. Early updates follow
    the live weights closely instead of holding on to the random initial ones for ~1/(1 - decay) steps.
    `n` is a device tensor (AveragedModel's count: no host sync) or a number (TrainStep's host counter)."""
    rate = (1 + n) / (10 + n)
    return rate.clamp(max=decay) if torch.is_tensor(rate) else min(rate, decay)


def ema_warmup_update(decay: float):
    """An AveragedModel multi_avg_fn with the warm-up decay; a device tensor throughout (no sync per step)."""

    @torch.no_grad()
    def update(ema_params, live_params, n_averaged: torch.Tensor) -> None:
        d = ema_warmup_decay(n_averaged.float(), decay)
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, live_params, 1 - d)
        else:  # integer buffers (BatchNorm's batch count), as torch's own EMA does
            for e, p in zip(ema_params, live_params):
                e.copy_(e * d + p * (1 - d))

    return update


def maybe_compile(model: nn.Module, mode: str, device: torch.device, example: torch.Tensor) -> nn.Module:
    """torch.compile the model, proven by one forward+backward; any failure falls back to eager."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return model
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}  # the trial step must not train
    try:
        compiled = torch.compile(model)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            compiled(example).float().sum().backward()
        return compiled
    except Exception as e:  # compile is an optimisation: fall back to eager, loudly
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training eagerly",
                      stacklevel=2)
        return model
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(snapshot)


@dataclass
class EpochParts:
    """What one training epoch reads and updates; the trainer (and the bench) build it once per run."""

    cfg: RunConfig
    model: nn.Module  # the module that trains: maybe compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per optimiser step
    images: torch.Tensor  # (N, 48, 48) uint8 on the training device
    labels: torch.Tensor  # (N,)
    train_idx: torch.Tensor  # the indices an epoch draws from
    gen: torch.Generator  # shuffling and augmentation; on the training device
    ema: torch.optim.swa_utils.AveragedModel | None = None
    amp_dtype: torch.dtype | None = None
    loss_weights: torch.Tensor | None = None  # per class, for the loss
    sample_weights: torch.Tensor | None = None  # per training example, for a balanced draw
    ctx: DistContext | None = None  # the process group under DDP, else None
    step_mode: str = "eager"  # how the step runs (fervit.training.step.STEP_MODES)
    channels_last: bool = False

    def __post_init__(self):
        # after the EMA is restored: the step reads its update count once
        from fervit.training.step import TrainStep

        rank, world = (self.ctx.rank, self.ctx.world_size) if self.ctx is not None else (0, 1)
        self.step = TrainStep(self.model, self.optimizer, self.scheduler, self.cfg, ema=self.ema,
                              amp_dtype=self.amp_dtype, loss_weights=self.loss_weights, mode=self.step_mode,
                              channels_last=self.channels_last, rank=rank, world=world)


def train_one_epoch(p: EpochParts, bar=None) -> dict:
    """One pass over a fresh permutation (or balanced draw) of p.train_idx; metrics stay on device.

    Under DDP every rank draws the same permutation and augments the whole global batch, so the shared
    generator stays in lockstep and the recipe is the single-process one; each rank then trains on its
    slice, and the returned metrics are summed over ranks.
    """
    p.model.train()
    device = p.images.device
    order = epoch_order(p)
    bs = p.cfg.train.batch_size
    n = len(order)
    # drop the last partial batch: equal shapes keep compiled graphs static, and the order is fresh each epoch
    n_used = n if n <= bs else n - n % bs
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for step, start in enumerate(range(0, n_used, bs)):
        idx = order[start:start + bs]
        loss, batch_correct = p.step(p.images[idx], p.labels[idx], p.gen)  # augment, forward, backward, update
        loss_sum += loss * len(idx)
        correct += batch_correct
        if bar is not None:
            bar.update(len(idx))
            if device.type == "cpu" and p.ctx is None and step % 10 == 0:  # a cheap read on CPU; on GPU per epoch
                seen = start + len(idx)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{float(correct) / seen:.3f}")
    if p.ctx is not None and p.ctx.world_size > 1:
        totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double()]), p.ctx)
        loss_sum, correct = totals[0], totals[1]
    return {"loss": float(loss_sum) / n_used, "acc": float(correct) / n_used}


def epoch_order(p: EpochParts) -> torch.Tensor:
    """This epoch's training examples in order: a permutation, or a class-balanced draw with replacement."""
    n = len(p.train_idx)
    if p.sample_weights is not None:
        return p.train_idx[torch.multinomial(p.sample_weights, n, replacement=True, generator=p.gen)]
    return p.train_idx[torch.randperm(n, generator=p.gen, device=p.images.device)]


def optimizer_step(objective: torch.Tensor, model: nn.Module, optimizer, scheduler, grad_clip: float) -> None:
    """Backward, optional gradient clipping, then one optimiser and one per-step schedule step (the bench's
    usual loop; fervit's own step is `TrainStep`, which does the same in phases)."""
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()


def shard_loss(logits, target, y_global, loss_weights, label_smoothing: float) -> torch.Tensor:
    """This rank's share of the global batch's mean loss: the shares of all ranks add up to exactly the
    loss one process would compute on the whole batch (also with class weights, whose mean divides by the
    summed weights of the global batch's labels)."""
    total = F.cross_entropy(logits, target, weight=loss_weights, label_smoothing=label_smoothing, reduction="sum")
    hard = target.dtype == torch.long
    denom = loss_weights[y_global].sum() if hard and loss_weights is not None else len(y_global)
    return total / denom
