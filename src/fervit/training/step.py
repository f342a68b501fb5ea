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
Clipping (foreach), the optimiser (fused AdamW on CUDA) and the EMA (foreach lerp) are a handful of
multi-tensor launches and stay outside the graph; the EMA here never reads the device (AveragedModel's
own `update_parameters` syncs twice per step to test `n_averaged`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from fervit.config import RunConfig
from fervit.data.augment import augment_batch, mix_batch
from fervit.errors import FervitError
from fervit.device import autocast
from fervit.models.checkpoint import unwrap
from fervit.training.epoch import ema_warmup_decay, shard_loss

STEP_MODES = ("eager", "compile", "cuda_graph")
BASE_BATCH = 128  # the batch size the presets' learning rates were tuned at


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
                 rank: int = 0, world: int = 1, compile_backend: str = "inductor", example: torch.Tensor | None = None):
        if mode not in STEP_MODES:
            raise FervitError(f"step mode must be one of {', '.join(STEP_MODES)}, got '{mode}'")
        self.model, self.optimizer, self.scheduler, self.cfg = model, optimizer, scheduler, cfg
        self.ema, self.amp_dtype, self.loss_weights = ema, amp_dtype, loss_weights
        self.rank, self.world = rank, world
        self.device = next(model.parameters()).device
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)  # only 4-D tensors (the conv weights) change layout
        self.mixing = cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0
        self.profile_phases = False  # the bench sets it: each phase in its own torch.profiler range
        self.mode, self.mode_used = mode, "eager"
        self.forward_loss: Callable = self._forward_loss
        self.ema_updates = int(ema.n_averaged) if ema is not None else 0  # read once: the EMA never syncs after
        if mode != "eager":
            if example is None:
                b, side = cfg.train.batch_size // world, cfg.model.crop_size or cfg.model.img_size
                example = torch.zeros(b, cfg.model.in_chans, side, side, device=self.device)
            self._compile(mode, compile_backend, example)

    # --- the phases ------------------------------------------------------------------------------
    def augment(self, images_u8: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        """Augmented images, targets (labels or soft targets) and this rank's hard labels."""
        x = augment_batch(images_u8, self.cfg.augment, gen, self.cfg.model.crop_size)  # (B, 1, S, S) float32
        target = y
        if self.mixing:
            x, target = mix_batch(x, y, self.cfg.augment, self.cfg.model.num_classes, gen)
        if self.world > 1:
            x, target, y = (t.tensor_split(self.world)[self.rank] for t in (x, target, y))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, target, y

    def _forward_loss(self, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor, y_all: torch.Tensor):
        """(loss, objective, correct): the batch loss, what backward differentiates, the correct count."""
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
        correct = (logits.detach().argmax(-1) == y).sum()
        return loss.detach(), objective, correct

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

    def __call__(self, images_u8: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        rec = torch.profiler.record_function if self.profile_phases else (lambda name: nullcontext())
        with rec("step.data_augment"):
            y_all = y
            x, target, y = self.augment(images_u8, y, gen)
        if self.mode_used == "cuda_graph":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be reused now
        with rec("step.forward"):
            loss, objective, correct = self.forward_loss(x, target, y, y_all)
        with rec("step.backward"):
            self.backward(objective)
        with rec("step.optimizer"):
            self.update()
        if self.mode_used == "cuda_graph":  # graph outputs live in a static pool that the next replay reuses
            loss, correct = loss.clone(), correct.clone()
        return loss, correct

    # --- EMA without a host sync -------------------------------------------------------------------
    @torch.no_grad()
    def _ema_update(self) -> None:
        """What `AveragedModel.update_parameters` computes with `build_ema`'s averaging (use_buffers=True; the
        decay warm-up with optim.ema_warmup), with the update count on a host counter instead of the device's
        `n_averaged`, so no step waits on the GPU."""
        ema, decay = self.ema, self.cfg.optim.ema_decay
        if self.cfg.optim.ema_warmup:
            decay = ema_warmup_decay(self.ema_updates, decay)  # on the host counter
        model = unwrap(self.model)
        own = [*ema.module.parameters(), *ema.module.buffers()]
        src = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if self.ema_updates == 0:
            for a, b in zip(own, src, strict=True):
                a.detach().copy_(b)
        else:
            groups: dict[tuple, tuple[list, list]] = {}
            for a, b in zip(own, src, strict=True):
                group = groups.setdefault((a.device, a.dtype), ([], []))
                group[0].append(a.detach())
                group[1].append(b)
            for (_, dtype), (mine, theirs) in groups.items():
                if dtype.is_floating_point or dtype.is_complex:
                    torch._foreach_lerp_(mine, theirs, 1 - decay)
                else:
                    for a, b in zip(mine, theirs):
                        a.copy_(a * decay + b * (1 - decay))
        ema.n_averaged += 1
        self.ema_updates += 1

    # --- compilation -------------------------------------------------------------------------------
    def _compile(self, mode: str, backend: str, example: torch.Tensor) -> None:
        """Compile forward + loss, proven by one forward+backward on `example`; any failure: eager, loudly.
        The trial leaves weights, gradients and the random streams as they were."""
        if mode == "cuda_graph" and self.device.type != "cuda":
            warnings.warn(f"step mode cuda_graph needs a CUDA device, not {self.device}; training eagerly",
                          stacklevel=3)
            return
        snapshot = {k: v.clone() for k, v in self.model.state_dict().items()}
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        kwargs = {"mode": "reduce-overhead"} if mode == "cuda_graph" else {}
        try:
            compiled = torch.compile(self._forward_loss, backend=backend, **kwargs)
            if self.channels_last:
                example = example.contiguous(memory_format=torch.channels_last)
            y = torch.zeros(len(example), dtype=torch.long, device=self.device)
            for _ in range(3 if mode == "cuda_graph" else 1):  # graph trees record on the 2nd call, replay on the 3rd
                if mode == "cuda_graph":
                    torch.compiler.cudagraph_mark_step_begin()
                _, objective, _ = compiled(example, y, y, y)
                objective.backward()
            self.forward_loss, self.mode_used = compiled, mode
        except Exception as e:  # compilation is an optimisation: fall back to eager, loudly
            warnings.warn(f"step mode {mode} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "training eagerly", stacklevel=3)
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.load_state_dict(snapshot)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)


def scaled_lr(base_lr: float, batch_size: int, optimizer: str = "adamw", base_batch: int = BASE_BATCH) -> float:
    """The learning rate for `batch_size`, from one tuned at `base_batch` (128 for every preset).

    AdamW: square-root scaling (Adam's update is normalised per coordinate, so the gradient noise, which
    shrinks as 1/sqrt(batch), sets the step; Malladi et al. 2022, "On the SDEs and scaling rules for
    adaptive gradient algorithms"). SGD: linear scaling (Goyal et al. 2017), with the usual warmup.
    """
    if batch_size < 1 or base_batch < 1:
        raise FervitError(f"batch sizes must be positive, got {batch_size} and {base_batch}")
    ratio = batch_size / base_batch
    if optimizer == "adamw":
        return base_lr * math.sqrt(ratio)
    if optimizer == "sgd":
        return base_lr * ratio
    raise FervitError(f"no lr scaling rule for optimizer '{optimizer}'; use adamw or sgd")


def fused_attention_backend(device: torch.device, head_dim: int = 32, heads: int = 6, tokens: int = 145,
                            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Which fused SDPA kernel runs attention of this shape, forward and backward, on `device`.

    Tries flash attention, then memory-efficient attention, each alone (`sdpa_kernel` with one backend
    allowed: the math fallback is not), and returns {"fused": bool, "backend": name | None, "detail": why}.
    """
    if device.type != "cuda":  # fervit.models.layers.attention_math: two batched matmuls beat the CPU flash kernel
        return {"fused": False, "backend": None,
                "detail": f"{device}: attention runs as two batched matmuls (attention_math); the CPU flash kernel's "
                          "backward is about 5x slower at 26-145 tokens"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    failures = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        q, k, v = (torch.randn(2, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        try:
            with sdpa_kernel([backend]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the refusal's reason comes as a warning before the error
                F.scaled_dot_product_attention(q, k, v).sum().backward()
            torch.cuda.synchronize(device)
            return {"fused": True, "backend": backend.name.lower(), "detail": f"head dim {head_dim}, {dtype}"}
        except RuntimeError as e:
            failures.append(f"{backend.name.lower()}: {str(e).splitlines()[0][:120]}")
    return {"fused": False, "backend": None, "detail": "; ".join(failures)}
