"""One training step as one callable: augmentation, forward, loss, backward, clipping, optimiser, EMA.

On a GPU the model step of a small ViT is launch-bound (hundreds of small kernels for 0.3 TFLOP), so the
step has three modes that compute the same thing at different launch costs:

- "eager": the trainer's own loop body, op by op.
- "compile": forward + loss go through `torch.compile` (Inductor fuses them, AOTAutograd the backward).
- "cuda_graph": the same function compiled with `mode="reduce-overhead"`: Inductor's CUDA graph trees
  capture the fused forward and backward kernels with static buffers and replay each as one launch.
  CUDA only; elsewhere, or when capture fails, the step warns and runs eagerly.

Randomness: the augmentation draws from the trainer's explicit `torch.Generator`, which a captured graph
cannot advance safely, so augmentation runs eagerly *before* the captured region and its output is the
graph's input (copied into the static input buffer by the graph tree); every random number of a step is
therefore drawn outside the graph, from the same stream, in the same order as the eager step. Dropout
inside a compiled forward uses Inductor's own Philox RNG seeded from the default generator, which CUDA
graph trees register with each graph: the masks follow the same distribution, not the eager masks.
Clipping (foreach), the optimiser (fused AdamW or SGD) and the EMA (foreach lerp) are a handful of
multi-tensor launches and stay outside the graph; the EMA here never reads the device (AveragedModel's
own `update_parameters` syncs twice per step to test `n_averaged`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from fervit.config import RunConfig
from fervit.data.augment import augment_batch, mix_batch
from fervit.errors import FervitError
from fervit.device import autocast
from fervit.models.checkpoint import unwrap
from fervit.training.parts import align_state_layout, compile_checked, ema_decay, update_ema
from fervit.training.teachers import Teachers, distillation_loss

STEP_MODES = ("eager", "compile", "cuda_graph")


def no_range(name: str) -> AbstractContextManager:
    return nullcontext()


def shard_loss(logits, target, y_global, loss_weights, label_smoothing: float) -> torch.Tensor:
    """This rank's share of the global batch's mean loss: the shares of all ranks add up to exactly the
    loss one process would compute on the whole batch (also with class weights, whose mean divides by the
    summed weights of the global batch's labels)."""
    total = F.cross_entropy(logits, target, weight=loss_weights, label_smoothing=label_smoothing, reduction="sum")
    hard = target.dtype == torch.long
    denom = loss_weights[y_global].sum() if hard and loss_weights is not None else len(y_global)
    return total / denom


class TrainStep:
    """`step(images_u8, y, gen) -> (loss, correct)`: one optimiser step on one batch, metrics on the device.

    `images_u8` (B, H, W) uint8 and `y` (B,) are the batch, indexed by the caller from the resident dataset;
    `gen` draws the augmentation (and mixing). Returns the batch's mean loss and its count of correct
    predictions (hard labels), both detached device scalars. `mode` is one of STEP_MODES; `mode_used`
    says what runs after any fallback. `channels_last` puts conv weights and inputs in NHWC (bf16 conv
    kernels prefer it). Under DDP pass `rank` and `world`: every rank augments the whole global batch and
    trains its slice, as `train_one_epoch` does.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: RunConfig, *,
                 ema: torch.optim.swa_utils.AveragedModel | None = None, amp_dtype: torch.dtype | None = None,
                 loss_weights: torch.Tensor | None = None, mode: str = "eager", channels_last: bool = False,
                 rank: int = 0, world: int = 1, compile_backend: str = "inductor", example: torch.Tensor | None = None,
                 teachers: Teachers | None = None):
        if mode not in STEP_MODES:
            raise FervitError(f"step mode must be one of {', '.join(STEP_MODES)}, got '{mode}'")
        self.model, self.optimizer, self.scheduler, self.cfg = model, optimizer, scheduler, cfg
        self.ema, self.amp_dtype, self.loss_weights = ema, amp_dtype, loss_weights
        self.rank, self.world = rank, world
        self.teachers = teachers
        self.device = next(model.parameters()).device
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)  # only 4-D tensors (the conv weights) change layout
            align_state_layout(optimizer)  # a restored state is contiguous; the fused step needs the weights' layout
        self.mixing = cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0
        self.keep_logits = cfg.optim.self_distill > 0  # the epoch stores each image's prediction (self-distillation)
        self.logits: torch.Tensor | None = None  # the last batch's, detached, when keep_logits
        self.side = 0  # >0: the side augmented images are sampled at (progressive resizing); 0: the model's own
        self.mode, self.mode_used = mode, "eager"
        self.forward_loss: Callable = self._forward_loss
        self.ema_updates = int(ema.n_averaged) if ema is not None else 0  # read once: the EMA never syncs after
        if mode != "eager":
            if example is None:
                b, side = cfg.train.batch_size // world, cfg.model.trained_side()
                example = torch.zeros(b, cfg.model.in_chans, side, side, device=self.device)
            self._compile(mode, compile_backend, example)

    # --- the phases ------------------------------------------------------------------------------
    def augment(self, images_u8: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                target: torch.Tensor | None = None):
        """Augmented images, targets (labels, or the soft `target` given, or mixed ones) and this rank's hard labels."""
        x = augment_batch(images_u8, self.cfg.augment, gen, self.cfg.model.crop_size, self.side)  # (B, 1, S, S)
        target = y if target is None else target
        if self.mixing:
            x, target = mix_batch(x, y, self.cfg.augment, self.cfg.model.num_classes, gen)
        if self.world > 1:
            x, target, y = (t.tensor_split(self.world)[self.rank] for t in (x, target, y))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, target, y

    def _forward_loss(self, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor, y_all: torch.Tensor):
        """(loss, objective, correct, logits): the batch loss, what backward differentiates, the correct count
        and the detached logits."""
        with autocast(self.device, self.amp_dtype):
            logits = self.model(x)
        logits = logits.float()
        if self.world == 1:
            loss = F.cross_entropy(logits, target, weight=self.loss_weights,
                                   label_smoothing=self.cfg.optim.label_smoothing)
            objective = loss
        else:
            loss = shard_loss(logits, target, y_all, self.loss_weights, self.cfg.optim.label_smoothing)
            objective = loss * self.world  # DDP averages gradients over ranks; the shares must add up instead
        if self.teachers is not None:
            w, kd = self.cfg.optim.distill_weight, distillation_loss(
                logits, self.teachers(x), self.cfg.optim.distill_temperature, len(y_all))
            loss, objective = (1 - w) * loss + w * kd.detach(), (1 - w) * objective + w * kd * self.world
        correct = (logits.detach().argmax(-1) == y).sum()
        return loss.detach(), objective, correct, logits.detach()

    def backward(self, objective: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()

    def update(self) -> None:
        """Clip, optimiser and schedule step, then the EMA."""
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self._ema_update()

    def __call__(self, images_u8: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                 target: torch.Tensor | None = None):
        return self.run_phases(images_u8, y, gen, target=target)

    def run_phases(self, images_u8: torch.Tensor, y: torch.Tensor, gen: torch.Generator,
                   phase: Callable[[str], AbstractContextManager] = no_range, target: torch.Tensor | None = None):
        """The step, each phase inside `phase(name)` (a profiler can time them there). `target`: soft targets
        (B, classes) to train on instead of the labels `y`."""
        with phase("step.data_augment"):
            y_all = y
            x, target, y = self.augment(images_u8, y, gen, target)
        if self.mode_used == "cuda_graph":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused now
        with phase("step.forward"):
            loss, objective, correct, logits = self.forward_loss(x, target, y, y_all)
        with phase("step.backward"):
            self.backward(objective)
        with phase("step.optimizer"):
            self.update()
        if self.mode_used == "cuda_graph":  # graph outputs live in a static pool that the next replay reuses
            loss, correct, logits = loss.clone(), correct.clone(), logits.clone() if self.keep_logits else logits
        self.logits = logits if self.keep_logits else None
        return loss, correct

    def _ema_update(self) -> None:
        """The EMA's update, its count on a host counter (read once at the start), so no step waits on the GPU."""
        update_ema(self.ema, unwrap(self.model), ema_decay(self.cfg.optim, self.ema_updates), self.ema_updates)
        self.ema_updates += 1

    # --- compilation -------------------------------------------------------------------------------
    def _compile(self, mode: str, backend: str, example: torch.Tensor) -> None:
        """Compile forward + loss, proven by one forward+backward on `example` (three for CUDA graphs: graph
        trees record on the second call and replay on the third); any failure: eager, loudly."""
        if mode == "cuda_graph" and self.device.type != "cuda":
            warnings.warn(f"step mode cuda_graph needs a CUDA device, not {self.device}; training eagerly",
                          stacklevel=3)
            return
        if self.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        y = torch.zeros(len(example), dtype=torch.long, device=self.device)

        def trial(compiled) -> None:
            for _ in range(3 if mode == "cuda_graph" else 1):
                if mode == "cuda_graph":
                    torch.compiler.cudagraph_mark_step_begin()
                _, objective, _, _ = compiled(example, y, y, y)
                objective.backward()

        kwargs = {"mode": "reduce-overhead"} if mode == "cuda_graph" else {}
        compiled = compile_checked(self._forward_loss, trial, self.model, f"step mode {mode}", backend=backend,
                                   **kwargs)
        if compiled is not None:
            self.forward_loss, self.mode_used = compiled, mode
