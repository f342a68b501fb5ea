"""Timing, FLOP counting, memory and machine description for the benchmark."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 tensor-core peaks (no sparsity) from the vendor's data sheets, matched on the device name
BF16_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM (HBM3)
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)


def sync(device: torch.device) -> None:
    """Wait for the device, so that a clock read covers the work queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The fastest of `repeats` timed calls: on a shared machine the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(max(repeats, 1)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def median_ms(fn: Callable[[int], object], runs: int, device: torch.device, warmup: int = 3) -> float:
    """Median wall time in milliseconds of fn(i) for i in range(runs), after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(max(runs, 1)):
        sync(device)
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def flops_per_image(model: nn.Module, in_chans: int, size: int, batch: int = 2) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image, counted by `FlopCounterMode` on a CPU copy."""
    x = torch.zeros(batch, in_chans, size, size)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    train = counter.get_total_flops() / batch
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / batch, train


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the peak of allocated tensor memory since the last reset. CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA max_memory_allocated while training (MiB); both rows include the resident dataset (83 MB)"
    return "peak RSS of the bench process so far, excluding DataLoader workers (MiB)"


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when it is not a GPU this table knows."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def cpu_peak_gflops(quick: bool = False, repeats: int = 3) -> dict:
    """This CPU's own throughput, measured: a square GEMM and a 3x3 convolution (64->64 channels at 24x24,
    a mid-stem layer of fervit's CPU models, forward), in fp32 and bf16 and, for the convolution, NCHW and
    NHWC (channels_last). GFLOP/s, best of `repeats`; `peak_gflops` is the bf16 convolution's best, the
    figure the CPU models' training throughput is a share of."""
    n, batch = (256, 8) if quick else (2048, 128)
    out = {"gemm_size": n, "conv": f"3x3 64->64, 24x24, batch {batch}"}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        out[f"gemm_{tag}"] = 2 * n**3 / best_seconds(lambda: torch.mm(a, b), repeats, torch.device("cpu")) / 1e9
        conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(dtype)
        for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            conv = conv.to(memory_format=fmt)
            x = torch.randn(batch, 64, 24, 24, dtype=dtype).contiguous(memory_format=fmt)
            with torch.no_grad():
                conv(x)
                seconds = best_seconds(lambda: conv(x), repeats, torch.device("cpu"))
            out[f"conv_{tag}_{layout}"] = 2 * batch * 24 * 24 * 64 * 64 * 9 / seconds / 1e9
    out["peak_gflops"] = max(out["conv_bf16_nchw"], out["conv_bf16_nhwc"])
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin, then sleep)"),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


FER2013_EPOCH = 28_709  # images in FER-2013's train/ folder: what "seconds per epoch" means


def train_row(images_s: float, device: torch.device) -> dict:
    """A training figure: img/s, the seconds one FER-2013 epoch takes at that rate, and peak memory."""
    return {"train_images_s": images_s, "epoch_s": FER2013_EPOCH / images_s, "peak_mem_mib": peak_memory_mib(device)}


def add_tflops(row: dict, gflops_per_image: float, peak: float | None, key: str = "train_images_s") -> None:
    """The row's achieved TFLOP/s (from its img/s under `key`) and its fraction of `peak`."""
    row["tflops"] = gflops_per_image * row[key] / 1000
    row["peak_fraction"] = row["tflops"] / peak if peak else None
