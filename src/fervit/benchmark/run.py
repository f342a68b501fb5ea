"""`fervit bench`: fervit's training pipeline side by side with the usual per-image one, in one run.

Same machine, same model, same batch size, same optimiser, same autocast and compile decision; only the
way images reach the model differs:
- fervit: the uint8 dataset resident on the device, batches indexed and augmented there
  (`augment_batch`), trained by the trainer's own `train_one_epoch`;
- usual: JPEG files decoded and augmented per image (PIL + torchvision) in DataLoader workers,
  each batch copied to the device, running metrics read back every step.
The data path alone (no model) is also timed for both, and for kornia's batched augmentation. The usual
pipeline runs with all CPUs as workers and with `few_workers` (4, a typical Slurm CPU share per GPU).

Where the time goes: each model's step broken into data+augmentation, forward, backward and optimizer
(`TrainStep` phases; torch.profiler device time on CUDA, synchronized wall clock everywhere); the step
modes (eager / compile / cuda_graph, channels_last) at batch 1x, 2x and 4x; the fused-attention check;
and aggregate img/s of 1, 2, 4 and 8 models trained at once, one process each (`benchmark.concurrent`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from fervit import __version__
from fervit.benchmark.measure import (best_seconds, bf16_peak_tflops, cpu_peak_gflops, flops_per_image, machine_info,
                                      median_ms, peak_memory_kind, peak_memory_mib, reset_peak_memory, sync)
from fervit.benchmark.pipelines import (ImageFiles, kornia_augment, torchvision_transforms, torchvision_version,
                                        usual_eval_transform, usual_loader, usual_train_transform)
from fervit.config import AugmentConfig, RunConfig, load_preset
from fervit.data.augment import augment_batch, normalize
from fervit.data.dataset import LAYOUT_HINT, load_fer
from fervit.errors import FervitError
from fervit.device import autocast, channels_last_choice, resolve_amp
from fervit.evaluation.evaluate import evaluate
from fervit.models import build_model, count_parameters
from fervit.benchmark.harness import EpochParts, optimizer_step, train_one_epoch
from fervit.benchmark.harness import PhasedTrainStep as TrainStep
from fervit.benchmark.probes import fused_attention_backend, scaled_lr
from fervit.training.parts import build_optimizer, maybe_compile
from fervit.training.step import STEP_MODES

FER2013_EPOCH = 28_709  # images in FER-2013's train/ folder: what "seconds per epoch" means
BREAKDOWN_STEPS = 50  # steps per phase breakdown: enough for a stable mean, a small profiler trace


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


class Stages:
    """One progress line per stage on stderr, with the time since the start."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.t0 = total, enabled, 0, time.time()

    def next(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"fervit bench [{time.time() - self.t0:5.0f}s] {self.done}/{self.total} {what}", file=sys.stderr,
                  flush=True)


def index_batches(indices: torch.Tensor, batches: int, batch_size: int, gen: torch.Generator):
    """`batches` index batches drawn epoch by epoch from fresh permutations, as the trainer draws them."""
    n, pos, order = len(indices), len(indices), indices
    for _ in range(batches):
        if pos + batch_size > n:
            order, pos = indices[torch.randperm(n, generator=gen, device=indices.device)], 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def run_benchmark(root: str | Path, cfg: BenchConfig, device: torch.device, cache_dir: str | None = None,
                  strict: bool = False, progress: bool = True, command: str = "",
                  on_partial: Callable[[dict], None] | None = None) -> dict:
    """Time every pipeline on `device`; returns the result that `format_table` prints and --json writes.

    `on_partial(result)` gets the result so far after each section (the CLI writes it to --json), so that a
    run stopped by a time limit still leaves what it measured.
    """
    stages = Stages(2 + 6 * len(cfg.models) + 1 + (1 if cfg.concurrency else 0) + (2 if device.type == "cpu" else 0),
                    progress)
    if not Path(root).exists():
        raise FervitError(f"data root '{root}' does not exist; {LAYOUT_HINT}")
    step_model = cfg.step_model or cfg.models[0]
    presets = {name: load_preset(name) for name in (*cfg.models, step_model)}  # unknown names fail before timing
    torchvision_transforms()  # so do missing extras
    # first, while this process holds no CUDA context: CUDA MPS serves the worker processes best with no
    # other (non-MPS) context on the GPU
    concurrency = _concurrency_rows(step_model, cfg, device, stages) if cfg.concurrency else []
    kornia = kornia_augment(AugmentConfig()).to(device)
    workers = cfg.workers or _cpu_count()
    few = cfg.few_workers or workers

    stages.next(f"loading {root}")
    t0 = time.perf_counter()
    data = load_fer(root, cache_dir, strict, progress=progress)
    load_s = time.perf_counter() - t0
    if data.paths and ":" in data.paths[0]:
        raise FervitError(f"'{root}' is a fer2013.csv; the usual pipeline reads image files, so give the folder "
                          "layout (ROOT/train/<class>/*.jpg, ROOT/test/<class>/*.jpg)")
    train_idx = torch.nonzero(data.folder == 0).flatten()
    test_idx = torch.nonzero(data.folder == 1).flatten()
    if len(train_idx) < cfg.batch_size or len(test_idx) == 0:
        raise FervitError(f"'{root}' has {len(train_idx)} train/ and {len(test_idx)} test/ images; the bench "
                          f"needs a full batch ({cfg.batch_size}) of train/ images and some test/ images")
    images, labels = data.images.to(device), data.labels.to(device)  # the whole dataset, resident
    train_dev, test_dev = train_idx.to(device), test_idx.to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def files(idx: torch.Tensor, transform) -> ImageFiles:
        return ImageFiles(root, [data.paths[i] for i in idx.tolist()], data.labels[idx].tolist(), transform)

    # --- the data path alone ---------------------------------------------------------------------
    bs = cfg.batch_size
    batches = max((cfg.data_images or len(train_idx)) // bs, 1)
    stages.next(f"data path alone: {batches} batches of {bs}, fervit, kornia and usual "
                f"({workers} workers), best of {cfg.repeats}")
    aug = AugmentConfig()

    def fervit_data(k: int) -> None:
        for idx in index_batches(train_dev, k, bs, gen):
            _ = augment_batch(images[idx], aug, gen), labels[idx]

    def kornia_data(k: int) -> None:
        for idx in index_batches(train_dev, k, bs, gen):
            _ = kornia(images[idx].unsqueeze(1).float() / 255.0), labels[idx]

    data_path = {}
    for name, fn in (("fervit", fervit_data), ("kornia", kornia_data)):
        fn(1)
        data_path[name] = {"images_s": batches * bs / best_seconds(lambda: fn(batches), cfg.repeats, device)}
    for key, n_workers in (("usual", workers), ("usual_few", few)):
        with _UsualBatches(files(train_idx, usual_train_transform(aug)), bs, n_workers, device, train=True) as usual:
            usual.take(1)  # worker start-up is not timed
            data_path[key] = {"images_s": batches * bs / best_seconds(lambda: usual.take(batches), cfg.repeats,
                                                                      device), "workers": n_workers}
    machine = machine_info(device)
    machine.update({"torchvision": torchvision_version(), "kornia": _kornia_version(), "fervit": __version__})
    peak = bf16_peak_tflops(device)
    cpu_peak = None
    if device.type == "cpu":  # no data sheet to read: the machine's own bf16 convolution rate is the peak
        stages.next("CPU peak: GEMM and 3x3 convolution, fp32 and bf16, NCHW and NHWC")
        cpu_peak = cpu_peak_gflops(quick=cfg.quick)
        peak = cpu_peak["peak_gflops"] / 1000
    result = {
        "command": command,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "settings": {**dataclasses.asdict(cfg), "workers": workers, "few_workers": few, "models": list(cfg.models),
                     "step_model": step_model, "amp": "bf16" if resolve_amp("auto", device) else "off",
                     "timing": f"each figure is the best of {cfg.repeats} timings after {cfg.warmup_steps} untimed "
                               "warm-up steps; epoch_s = 28,709 / train_images_s"},
        "dataset": {"root": str(root), "train_images": len(train_idx), "test_images": len(test_idx),
                    "load_s": load_s},
        "data_path": data_path,
        "data_path_ratio": data_path["fervit"]["images_s"] / data_path["usual"]["images_s"],
        "data_path_ratio_few": data_path["fervit"]["images_s"] / data_path["usual_few"]["images_s"],
        "kornia_ratio": data_path["fervit"]["images_s"] / data_path["kornia"]["images_s"],
        "bf16_peak_tflops": peak,
        "cpu_peak": cpu_peak,
        "peak_mem_kind": peak_memory_kind(device),
        "models": {},
        "concurrency": concurrency,  # measured first (see above); TFLOP/s added once the FLOPs are counted
    }

    def partial() -> None:
        if on_partial is not None:
            on_partial(result)

    partial()

    # --- training, evaluation, latency and the step's phases per model -------------------------------
    models = result["models"]
    for name in cfg.models:
        models[name] = _bench_model(name, presets[name], cfg, device, images, labels, train_dev, test_dev, gen,
                                    files(train_idx, None), files(test_idx, usual_eval_transform()), workers, few,
                                    stages)
        for pipe in ("fervit", "usual", "usual_few"):
            _add_tflops(models[name][pipe], models[name]["train_gflops_per_image"], peak)
        partial()

    # --- step modes, batch sizes, fused attention ---------------------------------------------------
    step_preset = presets[step_model]
    gflops = (models[step_model]["train_gflops_per_image"] if step_model in models
              else flops_per_image(build_model(step_preset.model), step_preset.model.in_chans,
                                   step_preset.model.img_size)[1] / 1e9)
    stages.next(f"{step_model}: step modes {', '.join(cfg.step_modes)} at batch "
                f"{', '.join(map(str, cfg.step_batches))}, and channels_last")
    result["step_model"] = step_model
    result["step_modes"] = _step_rows(step_preset, cfg, device, images, labels, train_dev, gen, gflops, peak)
    head_dim = step_preset.model.embed_dim // step_preset.model.num_heads
    result["fused_attention"] = fused_attention_backend(device, head_dim=head_dim, heads=step_preset.model.num_heads)
    partial()

    for row in concurrency:
        if "images_s" in row:
            _add_tflops(row, gflops, peak, key="images_s")
    partial()

    if device.type == "cpu":  # how many threads to train with when other work shares the machine
        from fervit.benchmark.threads import threads_under_load

        counts = tuple(sorted({1, max(_cpu_count(), 2)}))
        steps = 2 if cfg.quick else 10
        stages.next(f"{step_model}: training threads {', '.join(map(str, counts))}, idle and beside one busy "
                    f"process ({steps} steps of {step_preset.train.batch_size} each)")
        threads_preset = copy.deepcopy(step_preset)
        threads_preset.train.batch_size = cfg.batch_size
        result["threads_under_load"] = threads_under_load(threads_preset, images, labels, steps, counts)
        partial()
    return result


def _concurrency_rows(step_model: str, cfg: BenchConfig, device: torch.device, stages: Stages) -> list[dict]:
    """Aggregate img/s of 1, 2, 4, 8 models trained at once, one process each (`benchmark.concurrent`)."""
    import tempfile

    from fervit.benchmark.concurrent import measure_concurrency

    mode = _concurrency_mode(cfg, device)
    steps = cfg.concurrency_steps or cfg.train_steps or 200
    bs = cfg.batch_size
    stages.next(f"{step_model}: {', '.join(map(str, cfg.concurrency))} models trained at once ({mode}, "
                f"{steps} steps of {bs} each)")
    with tempfile.TemporaryDirectory(prefix="fervit-bench-") as folder:
        rows = measure_concurrency(step_model, cfg.concurrency, device=str(device), batch_size=bs, steps=steps,
                                   warmup=max(cfg.warmup_steps, 1), mode=mode, folder=Path(folder),
                                   threads=1 if device.type == "cpu" else 0, compile_backend=cfg.compile_backend)
    for row in rows:
        row.update({"mode": mode, "batch_size": bs, "steps": steps})
    return rows


def _add_tflops(row: dict, gflops_per_image: float, peak: float | None, key: str = "train_images_s") -> None:
    row["tflops"] = gflops_per_image * row[key] / 1000
    row["peak_fraction"] = row["tflops"] / peak if peak else None


def _concurrency_mode(cfg: BenchConfig, device: torch.device) -> str:
    """On CUDA the cheapest step mode the bench runs (cuda_graph, else compile); elsewhere eager, where
    every process compiling for itself would only time the compiler."""
    if device.type != "cuda" or cfg.compile == "off":
        return "eager"
    return next((m for m in ("cuda_graph", "compile") if m in cfg.step_modes), "eager")


def _new_step(preset: RunConfig, device, bs: int, mode: str, channels_last: bool, backend: str,
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


def _step_rows(preset: RunConfig, cfg: BenchConfig, device, images, labels, train_dev, gen, gflops: float,
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
        step, note = _new_step(preset, device, b, mode, channels_last, cfg.compile_backend, lr)
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
        _add_tflops(row, gflops, peak)
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
        _, objective, _ = step.forward_loss(x, target, y, labels[idx])
        lap("forward")
        step.backward(objective)
        lap("backward")
        step.update()
        lap("optimizer")
    out = {"steps": steps, "batch_size": bs, "mode_used": step.mode_used,
           "wall_ms": {k: v * 1000 / steps for k, v in phases.items()}}
    if device.type == "cuda":
        out["device_ms"] = _profiled_phases(step, images, labels, batches, gen)
    return out


def _profiled_phases(step: TrainStep, images, labels, batches, gen) -> dict:
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


def _bench_model(name: str, preset: RunConfig, cfg: BenchConfig, device, images, labels, train_dev, test_dev,
                 gen, train_files: ImageFiles, test_files: ImageFiles, workers: int, few: int, stages: Stages) -> dict:
    """Train, evaluate and single-image latency for one model, fervit's pipeline then the usual one."""
    bs = cfg.batch_size
    steps = min(cfg.train_steps or len(train_dev) // bs, len(train_dev) // bs)
    warmup = min(cfg.warmup_steps, steps)
    what = f"{steps} steps of {bs}, best of {cfg.repeats}"
    compiling = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    stages.next(f"{name}: model set-up{' and torch.compile' if compiling else ''}, training with the fervit "
                f"pipeline ({what})")
    preset.train.batch_size = bs
    preset.train.compile = cfg.compile
    torch.manual_seed(0)
    model = build_model(preset.model)
    fwd_flops, train_flops = flops_per_image(copy.deepcopy(model), preset.model.in_chans, preset.model.img_size)
    model.to(device)
    amp = resolve_amp("auto", device)
    channels_last = channels_last_choice(preset.train.channels_last, model, device)[0]
    optimizer = build_optimizer(model, preset, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    side = preset.model.crop_size or preset.model.img_size  # what training feeds the model
    example = torch.zeros(bs, preset.model.in_chans, side, side, device=device)
    train_model = maybe_compile(model, cfg.compile, device, example)  # on CUDA both pipelines train this module

    # fervit: the trainer's own epoch function on a random subset of train/ that holds k batches
    def fervit_steps(k: int) -> None:
        subset = train_dev[torch.randperm(len(train_dev), generator=gen, device=device)[:k * bs]]
        train_one_epoch(EpochParts(preset, train_model, optimizer, scheduler, images, labels, subset, gen,
                                   amp_dtype=amp, channels_last=channels_last))

    reset_peak_memory(device)
    if warmup:
        fervit_steps(warmup)
    fervit = _train_row(bs * steps / best_seconds(lambda: fervit_steps(steps), cfg.repeats, device), device)

    stages.next(f"{name}: training, usual pipeline ({what}, {workers} workers)")
    train_files.transform = usual_train_transform(preset.augment)
    # the usual script on a CPU: fp32 and NCHW, its own model (fervit's step made this one channels_last);
    # on CUDA it keeps the same module and autocast, as the GPU plans measured it
    usual_amp, usual_model, usual_train = amp, model, train_model
    usual_optimizer, usual_scheduler = optimizer, scheduler
    if device.type == "cpu":
        usual_amp, usual_model = None, build_model(preset.model).to(device)
        usual_train = usual_model
        usual_optimizer = torch.optim.AdamW(usual_model.parameters(), lr=preset.optim.lr)  # a user's default AdamW
        usual_scheduler = torch.optim.lr_scheduler.LambdaLR(usual_optimizer, lambda step: 1.0)
    usual_rows = {}
    for key, n_workers in (("usual", workers), ("usual_few", few)):
        if key == "usual_few" and n_workers == workers:  # the same measurement again: keep the first one
            usual_rows[key] = dict(usual_rows["usual"])
            continue
        if key == "usual_few":
            stages.next(f"{name}: training, usual pipeline ({what}, {n_workers} workers)")
        reset_peak_memory(device)
        with _UsualBatches(train_files, bs, n_workers, device, train=True) as usual:
            running = {"loss": 0.0, "correct": 0}

            def usual_steps(k: int) -> None:
                usual_train.train()
                for x, y in usual.batches(k):
                    with autocast(device, usual_amp):
                        logits = usual_train(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=preset.optim.label_smoothing)
                    optimizer_step(loss, usual_model, usual_optimizer, usual_scheduler, preset.optim.grad_clip)
                    # the usual loop keeps its running metrics as Python numbers: a host sync every step
                    running["loss"] += loss.item() * len(y)
                    running["correct"] += int((logits.argmax(-1) == y).sum().item())

            if warmup:
                usual_steps(warmup)
            usual_rows[key] = _train_row(bs * steps / best_seconds(lambda: usual_steps(steps), cfg.repeats, device),
                                         device)
            usual_rows[key]["workers"] = n_workers
    usual_row = usual_rows["usual"]

    # evaluation: the trainer evaluates the eager model; the usual loop reads its accuracy per batch
    n_eval = min(cfg.eval_images or len(test_dev), len(test_dev))
    stages.next(f"{name}: evaluation of {n_eval} test/ images, both pipelines, best of {cfg.repeats}")
    eval_idx = test_dev[:n_eval]
    evaluate(model, images, labels, eval_idx[:cfg.eval_batch_size], cfg.eval_batch_size, amp)  # warm-up
    fervit["eval_images_s"] = n_eval / best_seconds(
        lambda: evaluate(model, images, labels, eval_idx, cfg.eval_batch_size, amp), cfg.repeats, device)
    eval_files = copy.copy(test_files)
    eval_files.paths, eval_files.labels = test_files.paths[:n_eval], test_files.labels[:n_eval]
    with _UsualBatches(eval_files, cfg.eval_batch_size, workers, device, train=False) as usual:

        @torch.no_grad()
        def usual_eval() -> None:
            usual_model.eval()
            correct = 0
            for x, y in usual.epoch():
                with autocast(device, usual_amp):
                    correct += int((usual_model(x).argmax(-1) == y).sum().item())

        usual.take(1)
        usual_row["eval_images_s"] = n_eval / best_seconds(usual_eval, cfg.repeats, device)

    # single-image latency: an already decoded face (fervit) or a JPEG file (usual) to logits
    stages.next(f"{name}: single-image latency, median of {cfg.latency_runs}")
    model.eval()
    test_list = test_dev.tolist()
    eval_tf = test_files.transform

    @torch.inference_mode()
    def fervit_one(i: int) -> None:
        j = test_list[i % len(test_list)]
        with autocast(device, amp):
            model(normalize(images[j:j + 1]))

    @torch.inference_mode()
    def usual_one(i: int) -> None:
        x = eval_tf(test_files.load(i % len(test_files))).unsqueeze(0).to(device)
        usual_model.eval()
        with autocast(device, usual_amp):
            usual_model(x)

    fervit["latency_ms"] = median_ms(fervit_one, cfg.latency_runs, device)
    usual_row["latency_ms"] = median_ms(usual_one, cfg.latency_runs, device)
    if device.type == "cpu":  # what inference should use at batch 1 on this CPU: bf16 autocast or plain fp32
        @torch.inference_mode()
        def fp32_one(i: int) -> None:
            j = test_list[i % len(test_list)]
            model(normalize(images[j:j + 1]))

        fervit["latency_fp32_ms"] = median_ms(fp32_one, cfg.latency_runs, device)
        fervit["eval_fp32_images_s"] = n_eval / best_seconds(
            lambda: evaluate(model, images, labels, eval_idx, cfg.eval_batch_size, None), cfg.repeats, device)
    row = {
        "params": count_parameters(model),
        "batch_size": bs,
        "compiled": train_model is not model,
        "forward_gflops_per_image": fwd_flops / 1e9,
        "train_gflops_per_image": train_flops / 1e9,
        "fervit": fervit,
        "usual": usual_row,
        "usual_few": usual_rows["usual_few"],
        "train_ratio": fervit["train_images_s"] / usual_row["train_images_s"],
        "train_ratio_few": fervit["train_images_s"] / usual_rows["usual_few"]["train_images_s"],
        "eval_ratio": fervit["eval_images_s"] / usual_row["eval_images_s"],
    }
    # where a step's time goes: the step of the model trained above (compiled or not), phase by phase
    stages.next(f"{name}: step breakdown ({'compiled' if row['compiled'] else 'eager'} model, {steps} steps of {bs})")
    step = TrainStep(train_model, optimizer, scheduler, preset, amp_dtype=amp, channels_last=channels_last)
    step(images[train_dev[:bs]], labels[train_dev[:bs]], gen)  # warm-up
    row["breakdown"] = step_breakdown(step, images, labels, train_dev, gen, min(steps, BREAKDOWN_STEPS), device)
    row["breakdown"]["model_compiled"] = row["compiled"]
    del model, train_model, optimizer, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _train_row(images_s: float, device: torch.device) -> dict:
    return {"train_images_s": images_s, "epoch_s": FER2013_EPOCH / images_s, "peak_mem_mib": peak_memory_mib(device)}


class _UsualBatches:
    """The usual DataLoader, iterated across epoch boundaries, each batch copied to the device."""

    def __init__(self, dataset: ImageFiles, batch_size: int, workers: int, device: torch.device, train: bool):
        self.loader = usual_loader(dataset, batch_size, workers, device, train)
        self.device = device
        self._stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream = None
        self.loader = None  # its persistent workers shut down with it

    def _to_device(self, batch):
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def batches(self, k: int):
        """The next k batches, continuing where the last call stopped, wrapping over epochs."""
        if self._stream is None:
            self._stream = itertools.chain.from_iterable(itertools.repeat(self.loader))
        for batch in itertools.islice(self._stream, k):
            yield self._to_device(batch)

    def take(self, k: int) -> None:
        for _ in self.batches(k):
            pass

    def epoch(self):
        """One whole pass, from the start of the dataset."""
        self._stream = None
        for batch in self.loader:
            yield self._to_device(batch)


def _cpu_count() -> int:
    return os.cpu_count() or 1


def _kornia_version() -> str | None:
    try:
        import kornia
    except ImportError:
        return None
    return kornia.__version__


def format_table(result: dict) -> str:
    """The result as one plain-text table, the same one BENCHMARKS.md quotes."""
    m, s = result["machine"], result["settings"]
    dp = result["data_path"]
    lines = [
        f"fervit bench on {m['device']} ({m['device_name']}; {m['cpu_count']} CPUs, {m['torch_threads']} torch "
        f"threads, OMP_WAIT_POLICY {m['omp_wait_policy']}) | torch {m['torch']} | torchvision {m['torchvision']} | "
        f"kornia {m['kornia']}",
        f"command: {result['command']}",
        f"batch {s['batch_size']} (eval {s['eval_batch_size']}), amp {s['amp']}, usual pipeline with "
        f"{s['workers']} and {s['few_workers']} DataLoader workers; {s['timing']}",
        "",
        "data path alone (augmented images/s, no model)",
        f"  fervit  device-side, batched           {dp['fervit']['images_s']:>10,.0f}",
        f"  kornia  AugmentationSequential          {dp['kornia']['images_s']:>10,.0f}   fervit/kornia "
        f"{result['kornia_ratio']:.1f}x",
        f"  usual   PIL + torchvision per image     {dp['usual']['images_s']:>10,.0f}   fervit/usual "
        f"{result['data_path_ratio']:.1f}x   ({dp['usual']['workers']} workers)",
        f"  usual   the same, {dp['usual_few']['workers']:>2} workers          {dp['usual_few']['images_s']:>10,.0f}"
        f"   fervit/usual {result['data_path_ratio_few']:.1f}x",
        "",
        f"{'model':<10} {'pipeline':<13} {'train img/s':>11} {'epoch s':>9} {'eval img/s':>10} {'latency ms':>10} "
        f"{'peak MiB':>9} {'TFLOP/s':>8}",
    ]
    for name, row in result["models"].items():
        for pipe in ("fervit", "usual", "usual_few"):
            r = row[pipe]
            label = f"usual {r['workers']}w" if pipe.startswith("usual") else pipe
            eval_s = f"{r['eval_images_s']:>10,.1f}" if "eval_images_s" in r else f"{'-':>10}"
            latency = f"{r['latency_ms']:>10.2f}" if "latency_ms" in r else f"{'-':>10}"
            lines.append(f"{name if pipe == 'fervit' else '':<10} {label:<13} {r['train_images_s']:>11,.1f} "
                         f"{r['epoch_s']:>9,.1f} {eval_s} {latency} {r['peak_mem_mib']:>9,.0f} {r['tflops']:>8.3f}")
        lines.append(f"{'':<10} {'fervit/usual':<13} {row['train_ratio']:>10.2f}x {'':>9} {row['eval_ratio']:>9.2f}x"
                     f"   ({row['train_ratio_few']:.2f}x against {row['usual_few']['workers']} workers)")
    lines.append("")
    peak = result["bf16_peak_tflops"]
    for name, row in result["models"].items():
        if result.get("cpu_peak"):  # a CPU's rates read better in GFLOP/s
            achieved = (f"; fervit trains at {row['fervit']['tflops'] * 1000:.0f} GFLOP/s, "
                        f"{row['fervit']['peak_fraction']:.1%} of the measured {peak * 1000:.0f} GFLOP/s bf16 conv peak")
        else:
            achieved = (f"; fervit trains at {row['fervit']['tflops']:.1f} TFLOP/s, "
                        f"{row['fervit']['peak_fraction']:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else "")
        lines.append(f"{name}: {row['params'] / 1e6:.2f}M parameters, {row['forward_gflops_per_image']:.3f} GFLOP "
                     f"forward / {row['train_gflops_per_image']:.3f} GFLOP train per image, "
                     f"{'compiled' if row['compiled'] else 'eager'}{achieved}")
    cpu = result.get("cpu_peak")
    if cpu:
        lines.append(f"CPU peak, measured (GFLOP/s): GEMM {cpu['gemm_size']}^2 fp32 {cpu['gemm_fp32']:.0f}, bf16 "
                     f"{cpu['gemm_bf16']:.0f}; conv {cpu['conv']}: fp32 NCHW {cpu['conv_fp32_nchw']:.0f}, fp32 NHWC "
                     f"{cpu['conv_fp32_nhwc']:.0f}, bf16 NCHW {cpu['conv_bf16_nchw']:.0f}, bf16 NHWC "
                     f"{cpu['conv_bf16_nhwc']:.0f}; peak = the bf16 convolution's {cpu['peak_gflops']:.0f}")
        for name, row in result["models"].items():
            f = row["fervit"]
            if "latency_fp32_ms" in f:
                lines.append(f"{name}: inference without autocast (fp32): eval {f['eval_fp32_images_s']:,.0f} img/s, "
                             f"batch-1 latency {f['latency_fp32_ms']:.2f} ms (bf16 autocast: {f['eval_images_s']:,.0f}"
                             f" img/s, {f['latency_ms']:.2f} ms)")
    elif not peak:
        lines.append("bf16 peak: not known for this device")
    lines.append(f"peak memory: {result['peak_mem_kind']}")
    lines += _breakdown_lines(result) + _step_mode_lines(result) + _concurrency_lines(result) + _thread_lines(result)
    return "\n".join(lines)


def _thread_lines(result: dict) -> list[str]:
    rows = result.get("threads_under_load", [])
    if not rows:
        return []
    lines = ["", f"training threads beside other work ({result.get('step_model')}, batch {rows[0]['batch_size']}, "
                 f"{rows[0]['steps']} timed steps; busy = one process spinning on one core)",
             f"{'threads':>7} {'busy':>5} {'train img/s':>11}"]
    lines += [f"{r['threads']:>7} {r['busy_processes']:>5} {r['train_images_s']:>11,.1f}" for r in rows]
    return lines


def _pct(fraction) -> str:
    return f"{fraction:.1%}" if fraction is not None else "-"


def _breakdown_lines(result: dict) -> list[str]:
    lines = ["", "where a training step's time goes (ms per step; wall clock with the device synchronized "
                 "between phases" + (", and torch.profiler device time)" if result["machine"]["device"] != "cpu"
                                     else ")")]
    phases = ("data_augment", "forward", "backward", "optimizer")
    lines.append(f"{'model':<10} {'clock':<8} " + " ".join(f"{p:>12}" for p in phases) + f" {'total':>9}")
    for name, row in result["models"].items():
        b = row["breakdown"]
        for clock in ("wall_ms", "device_ms"):
            if clock in b:
                ms = b[clock]
                lines.append(f"{name if clock == 'wall_ms' else '':<10} {clock[:-3]:<8} "
                             + " ".join(f"{ms.get(p, 0.0):>12.2f}" for p in phases)
                             + f" {sum(ms.get(p, 0.0) for p in phases):>9.2f}")
    return lines


def _step_mode_lines(result: dict) -> list[str]:
    rows = result.get("step_modes", [])
    attention = result.get("fused_attention", {})
    lines = ["", f"step modes of {result.get('step_model')} (lr scaled by fervit.training.step.scaled_lr: sqrt "
                 f"of batch/{result['settings']['batch_size']} for AdamW)",
             f"{'mode':<11} {'ran as':<11} {'batch':>5} {'NHWC':>5} {'lr':>9} {'train img/s':>11} {'epoch s':>8} "
             f"{'TFLOP/s':>8} {'of peak':>7} {'set-up s':>8}"]
    for r in rows:
        nhwc = "yes" if r["channels_last"] else ""
        lines.append(f"{r['mode']:<11} {r['mode_used']:<11} {r['batch_size']:>5} {nhwc:>5} "
                     f"{r['lr']:>9.2e} {r['train_images_s']:>11,.1f} {r['epoch_s']:>8,.2f} {r['tflops']:>8.3f} "
                     f"{_pct(r['peak_fraction']):>7} {r.get('setup_s', 0.0):>8.1f}")
    if attention:
        lines.append(f"fused attention: {attention['backend'] or 'none'} ({attention['detail']})")
    return lines


def _concurrency_lines(result: dict) -> list[str]:
    rows = result.get("concurrency", [])
    if not rows:
        return []
    first = rows[0]
    lines = ["", f"models trained at once, one process each ({result.get('step_model')}, step mode {first['mode']}, "
                 f"batch {first['batch_size']}, {first['steps']} timed steps per process)",
             f"{'processes':>9} {'MPS':>4} {'aggregate img/s':>15} {'x one':>6} {'TFLOP/s':>8} {'of peak':>7}  "
             "per process img/s"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['processes']:>9} {'':>4} failed: {r['error']}")
            continue
        per = ", ".join(f"{v:,.0f}" for v in r["per_process_images_s"])
        lines.append(f"{r['processes']:>9} {'yes' if r['mps'] else 'no':>4} {r['images_s']:>15,.1f} "
                     f"{r.get('x_one', 0):>5.2f}x {r['tflops']:>8.3f} {_pct(r['peak_fraction']):>7}  {per}")
    return lines
