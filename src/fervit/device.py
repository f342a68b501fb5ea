"""Where and in which precision a model runs: shared by training, evaluation and inference."""

from __future__ import annotations

import contextlib

import torch

from fervit.errors import FervitError


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device; a one-line error for CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FervitError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FervitError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """auto (bf16 on CUDA, else full precision) | bf16 | off -> the autocast dtype, None for none."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "bf16":
        return torch.bfloat16
    if name == "off":
        return None
    raise FervitError(f"train.amp must be auto, bf16 or off, got '{name}'")


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """torch.autocast in `amp_dtype`, or nothing when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)
