"""Training threads beside other work: the CPU step's img/s at 1 and 2 (or more) threads, on an idle machine
and with one busy process beside it.

An OpenMP region ends when its slowest thread does, so a thread whose core another process holds stalls every
op of the step; fewer threads than free cores avoid that. This is what `train.threads` is chosen by.
"""

from __future__ import annotations

import time

import torch

from fervit.benchmark.busy import busy_process
from fervit.config import RunConfig
from fervit.device import channels_last_choice, resolve_amp
from fervit.models import build_model
from fervit.training.parts import build_optimizer
from fervit.training.step import TrainStep



def _images_s(preset: RunConfig, images: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(preset.model)
    optimizer = build_optimizer(model, preset, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = TrainStep(model, optimizer, scheduler, preset, amp_dtype=resolve_amp("auto", device),
                     channels_last=channels_last_choice(preset.train.channels_last, model, device)[0])
    gen = torch.Generator().manual_seed(0)
    bs = preset.train.batch_size
    batches = [torch.randint(0, len(images), (bs,), generator=gen) for _ in range(warmup + steps)]
    for idx in batches[:warmup]:
        step(images[idx], labels[idx], gen)
    t0 = time.perf_counter()
    for idx in batches[warmup:]:
        step(images[idx], labels[idx], gen)
    return bs * steps / (time.perf_counter() - t0)


def threads_under_load(preset: RunConfig, images: torch.Tensor, labels: torch.Tensor, steps: int,
                       thread_counts: tuple[int, ...], warmup: int = 2) -> list[dict]:
    """img/s of `preset`'s CPU training step for each thread count, idle and beside one busy process."""
    before = torch.get_num_threads()
    rows = []
    try:
        for load in (False, True):
            with busy_process(load):
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    rows.append({"threads": threads, "busy_processes": int(load), "batch_size": preset.train.batch_size,
                                 "steps": steps, "train_images_s": _images_s(preset, images, labels, steps, warmup)})
    finally:
        torch.set_num_threads(before)
    return rows
