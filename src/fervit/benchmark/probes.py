"""The bench's own rules and probes: the lr scaling it sweeps batch sizes with, and which fused attention
kernel runs on the device. Training uses neither: a preset's lr is the one it was tuned at."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from fervit.errors import FervitError

BASE_BATCH = 128  # the batch size the presets' learning rates were tuned at


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
