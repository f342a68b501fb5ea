"""The training step alone: img/s per step mode and batch size, and where one step's time goes."""

from __future__ import annotations

import copy
import time
import warnings

import torch

from fervit.benchmark.config import BenchConfig
from fervit.benchmark.measure import FER2013_EPOCH, add_tflops, best_seconds, sync
from fervit.benchmark.pipelines import index_batches
from fervit.config import RunConfig
from fervit.device import resolve_amp
from fervit.models import build_model
from fervit.benchmark.harness import PhasedTrainStep as TrainStep
from fervit.benchmark.probes import scaled_lr
from fervit.training.parts import build_optimizer


def new_step(preset: RunConfig, device, bs: int, mode: str, channels_last: bool, backend: str,
              lr: float | None = None):
    """A fresh model, optimiser and TrainStep (no EMA unless the preset has one), seeded."""
    cfg = copy.deepcopy(preset)
    cfg.train.batch_size = bs
    if lr is not None:
        cfg.optim.lr = lr
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = None
    if cfg.optim.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema_decay), use_buffers=True)
    with warnings.catch_warnings(record=True) as caught:  # a fallback is reported in the row, not as a warning
        warnings.simplefilter("always")
        step = TrainStep(model, optimizer, scheduler, cfg, ema=ema, amp_dtype=resolve_amp("auto", device),
                         mode=mode, channels_last=channels_last, compile_backend=backend)
    note = next((str(w.message) for w in caught if "training eagerly" in str(w.message)), "")
    return step, note


def step_rows(preset: RunConfig, cfg: BenchConfig, device, images, labels, train_dev, gen, gflops: float,
               peak: float | None) -> list[dict]:
    """img/s of the training step per mode and batch size (lr scaled by `scaled_lr`), plus channels_last.

    eager and cuda_graph run at every batch size; compile (cuda_graph without the graphs) only at the base
    batch, each compilation costing a minute of a GPU session.
    """
    modes = [m for m in cfg.step_modes if device.type == "cuda" or m != "cuda_graph"]  # CUDA graphs: CUDA only
    plan = [(mode, b, False) for mode in modes for b in (cfg.step_batches if mode != "compile" else cfg.step_batches[:1])]
    plan += [(mode, cfg.step_batches[0], True) for mode in modes]
    compiling = cfg.compile != "off"
    rows = []
    for mode, b, channels_last in plan:
        if mode != "eager" and not compiling:
            continue
        lr = scaled_lr(preset.optim.lr, b, base_batch=cfg.batch_size)  # the preset's lr holds at the bench's batch
        t_setup = time.perf_counter()
        step, note = new_step(preset, device, b, mode, channels_last, cfg.compile_backend, lr)
        setup_s = time.perf_counter() - t_setup  # compilation (and its trial step) for compile / cuda_graph
        steps = max(min(cfg.train_steps or len(train_dev) // b, len(train_dev) // b), 1)

        def run(k: int) -> None:
            for idx in index_batches(train_dev, k, b, gen) if len(train_dev) >= b else \
                    (torch.randint(0, len(train_dev), (b,), device=device, generator=gen) for _ in range(k)):
                step(images[idx], labels[idx], gen)

        run(max(cfg.warmup_steps, 1))
        images_s = b * steps / best_seconds(lambda: run(steps), cfg.repeats, device)
        row = {"mode": mode, "mode_used": step.mode_used, "batch_size": b, "channels_last": channels_last, "lr": lr,
               "steps": steps, "train_images_s": images_s, "epoch_s": FER2013_EPOCH / images_s, "setup_s": setup_s}
        if note:
            row["note"] = note
        add_tflops(row, gflops, peak)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def step_breakdown(step: TrainStep, images, labels, train_dev, gen, steps: int, device: torch.device) -> dict:
    """Milliseconds per step in data+augmentation, forward, backward and optimizer.

    Everywhere: wall clock with the device synchronized between phases (the sync itself costs a little on
    CUDA). On CUDA also torch.profiler's device time of each phase's `record_function` range.
    """
    bs = step.cfg.train.batch_size
    batches = list(index_batches(train_dev, steps, bs, gen))
    phases = {"data_augment": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    clock = [0.0]

    def lap(phase: str | None) -> None:
        sync(device)
        now = time.perf_counter()
        if phase:
            phases[phase] += now - clock[0]
        clock[0] = now

    for idx in batches:
        lap(None)
        x, target, y = step.augment(images[idx], labels[idx], gen)
        lap("data_augment")
        if step.mode_used == "cuda_graph":
            torch.compiler.cudagraph_mark_step_begin()
        _, objective, _, _ = step.forward_loss(x, target, y, labels[idx])
        lap("forward")
        step.backward(objective)
        lap("backward")
        step.update()
        lap("optimizer")
    out = {"steps": steps, "batch_size": bs, "mode_used": step.mode_used,
           "wall_ms": {k: v * 1000 / steps for k, v in phases.items()}}
    if device.type == "cuda":
        out["device_ms"] = profiled_phases(step, images, labels, batches, gen)
    return out


def profiled_phases(step: TrainStep, images, labels, batches, gen) -> dict:
    """Device (kernel) milliseconds per step of each phase, from torch.profiler's record_function ranges."""
    from torch.profiler import ProfilerActivity, profile

    step.profile_phases = True
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for idx in batches:
                step(images[idx], labels[idx], gen)
            torch.cuda.synchronize()
    finally:
        step.profile_phases = False
    totals: dict[str, float] = {}
    for event in prof.events():  # the CPU-side ranges: their device time sums the kernels launched inside
        if event.name.startswith("step.") and event.device_type == torch.autograd.DeviceType.CPU:
            device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            totals[event.name[5:]] = totals.get(event.name[5:], 0.0) + device_us / 1000 / len(batches)
    return totals

