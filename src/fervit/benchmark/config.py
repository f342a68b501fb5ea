"""What `fervit bench` times and how much: the sizes per device, checked before anything is timed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fervit.errors import FervitError
from fervit.training.step import STEP_MODES



@dataclass
class BenchConfig:
    """How much to time. Zero sizes mean "the whole split"; every timing is the best of `repeats`."""

    models: tuple[str, ...] = ("vit_cnn", "vit_patch")  # preset names: the models at their original sizes
    batch_size: int = 128
    eval_batch_size: int = 1024
    data_images: int = 0  # augmented images per data-path timing; 0: one epoch of train/
    train_steps: int = 0  # optimiser steps per training timing; 0: one epoch of train/
    eval_images: int = 0  # images per evaluation timing; 0: all of test/
    warmup_steps: int = 3  # untimed steps first: compilation, allocator, DataLoader worker start-up
    repeats: int = 3
    latency_runs: int = 100
    workers: int = 0  # DataLoader workers for the usual pipeline; 0: the machine's CPU count
    compile: str = "auto"  # as train.compile: auto compiles on CUDA only
    few_workers: int = 4  # the usual pipeline again with this many workers (a typical Slurm CPU share per GPU)
    step_model: str = ""  # the model of the step-mode and concurrency rows; "": the first of `models`
    step_modes: tuple[str, ...] = ("eager", "compile", "cuda_graph")
    step_batches: tuple[int, ...] = ()  # (): batch_size x 1, 2 and 4
    concurrency: tuple[int, ...] = (1, 2, 4, 8)  # models trained at once, one process each; (): skip
    concurrency_steps: int = 0  # timed steps per process; 0: train_steps, or 200 when that is a whole epoch
    compile_backend: str = "inductor"  # torch.compile backend of the step modes (quick CPU runs: aot_eager)
    quick: bool = False


def bench_config(device: torch.device, quick: bool = False, **overrides) -> BenchConfig:
    """The sizes for this device: whole epochs on a GPU, a few steps on a CPU, tiny ones with `quick`.

    `overrides` (None values ignored) replace single fields, e.g. `batch_size=64`.
    """
    if quick:  # a smoke run for CI: every code path, numbers only indicative
        cfg = BenchConfig(batch_size=32, eval_batch_size=64, data_images=1024, train_steps=1, eval_images=64,
                          warmup_steps=1, repeats=2, latency_runs=5, concurrency=(1, 2), quick=True,
                          compile_backend="inductor" if device.type == "cuda" else "aot_eager")
    elif device.type == "cuda":
        cfg = BenchConfig()
    else:  # a CPU: 20 timed steps per figure, extrapolated to the epoch; the CPU preset first
        cfg = BenchConfig(models=("cpu", "vit_cnn", "hybrid"), data_images=8192, train_steps=20, eval_images=1024,
                          warmup_steps=2, repeats=1, latency_runs=50, concurrency=(1, 2), few_workers=0)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    for name in ("batch_size", "eval_batch_size", "repeats", "latency_runs"):
        if getattr(cfg, name) < 1:
            raise FervitError(f"bench {name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("data_images", "train_steps", "eval_images", "warmup_steps", "workers", "few_workers",
                 "concurrency_steps"):
        if getattr(cfg, name) < 0:
            raise FervitError(f"bench {name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.compile not in ("auto", "on", "off"):
        raise FervitError(f"bench compile must be auto, on or off, got '{cfg.compile}'")
    bad = [m for m in cfg.step_modes if m not in STEP_MODES]
    if bad:
        raise FervitError(f"bench step modes must be among {', '.join(STEP_MODES)}, got {', '.join(bad)}")
    if any(b < 1 for b in (*cfg.step_batches, *cfg.concurrency)):
        raise FervitError("bench step batches and concurrency counts must be at least 1")
    cfg.models, cfg.step_modes = tuple(cfg.models), tuple(cfg.step_modes)
    cfg.step_batches = tuple(cfg.step_batches) or (cfg.batch_size, 2 * cfg.batch_size, 4 * cfg.batch_size)
    cfg.concurrency = tuple(cfg.concurrency)
    return cfg

