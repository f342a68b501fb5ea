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


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


# flags of CPUs that run bf16 matmuls and convolutions in hardware (x86 AVX512-BF16 and AMX, Arm BF16)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16() -> tuple[bool, str]:
    """(whether bf16 autocast pays on this CPU, why). oneDNN emulates bf16 on CPUs without it, many times
    slower than fp32 on AVX2-only chips (pytorch/pytorch#146508), so it needs oneDNN's bf16 *and* a flag
    that says the hardware has it."""
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if not onednn:
        return False, "oneDNN has no bf16 kernels for this CPU"
    found = [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]
    if not found:
        return False, "the CPU has no native bf16 (no avx512_bf16, amx_bf16 or bf16 flag); bf16 would be emulated"
    return True, f"the CPU has {found[0]}"


def amp_choice(name: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """train.amp -> (autocast dtype or None, why): auto is bf16 on CUDA and on CPUs with native bf16."""
    if name == "bf16":
        return torch.bfloat16, "train.amp=bf16"
    if name == "off":
        return None, "train.amp=off"
    if name != "auto":
        raise FervitError(f"train.amp must be auto, bf16 or off, got '{name}'")
    if device.type == "cuda":
        return torch.bfloat16, "auto: CUDA"
    if device.type == "cpu":
        native, why = cpu_bf16()
        return (torch.bfloat16 if native else None), f"auto: {why}"
    return None, f"auto: full precision on {device.type}"


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """auto (bf16 on CUDA and on CPUs with native bf16, else full precision) | bf16 | off -> the autocast
    dtype, None for none."""
    return amp_choice(name, device)[0]


def channels_last_choice(name: str, model: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """train.channels_last -> (use NHWC, why). auto: on a CPU for a model with convolutions (oneDNN's
    convolutions run about twice as fast in NHWC there, in fp32 and in bf16; BENCHMARKS.md); off on GPUs,
    where the plans were measured in NCHW."""
    if name in ("on", "off"):
        return name == "on", f"train.channels_last={name}"
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if device.type != "cpu":
        return False, f"auto: off on {device.type}"
    return has_conv, "auto: " + ("the model has convolutions" if has_conv else "the model has no convolution")


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """torch.autocast in `amp_dtype`, or nothing when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)
