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
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from fervit import __version__
from fervit.benchmark.config import BenchConfig
from fervit.benchmark.measure import (add_tflops, best_seconds, bf16_peak_tflops, cpu_peak_gflops, flops_per_image,
                                      machine_info, peak_memory_kind)
from fervit.benchmark.model_rows import bench_model
from fervit.benchmark.pipelines import (ImageFiles, UsualBatches, index_batches, kornia_augment,
                                        torchvision_transforms, torchvision_version, usual_eval_transform,
                                        usual_train_transform)
from fervit.benchmark.step_modes import step_rows
from fervit.config import AugmentConfig, RunConfig, load_preset
from fervit.data.augment import augment_batch
from fervit.data.dataset import LAYOUT_HINT, load_fer
from fervit.errors import FervitError
from fervit.device import resolve_amp
from fervit.models import build_model
from fervit.benchmark.probes import fused_attention_backend


class Stages:
    """One progress line per stage on stderr, with the time since the start."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.t0 = total, enabled, 0, time.time()

    def next(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"fervit bench [{time.time() - self.t0:5.0f}s] {self.done}/{self.total} {what}", file=sys.stderr,
                  flush=True)


def run_benchmark(root: str | Path, cfg: BenchConfig, device: torch.device, cache_dir: str | None = None,
                  strict: bool = False, progress: bool = True, command: str = "",
                  on_partial: Callable[[dict], None] | None = None) -> dict:
    """Time every pipeline on `device`; returns the result that `format_table` prints and --json writes.

    `on_partial(result)` gets the result so far after each section (the CLI writes it to --json), so that a
    run stopped by a time limit still leaves what it measured.
    """
    stages = Stages(2 + 6 * len(cfg.models) + 1 + (1 if cfg.concurrency else 0) + (3 if device.type == "cpu" else 0),
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
    whole_faces = RunConfig()  # the data path alone is timed on whole 48 px faces, every pipeline alike
    aug = whole_faces.augment

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
    whole_face_transform = usual_train_transform(whole_faces)
    for key, n_workers in (("usual", workers), ("usual_few", few)):
        if key == "usual_few" and n_workers == workers:  # the same measurement again: keep the first one
            data_path[key] = dict(data_path["usual"])
            continue
        with UsualBatches(files(train_idx, whole_face_transform), bs, n_workers, device, train=True) as usual:
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
        models[name] = bench_model(name, presets[name], cfg, device, images, labels, train_dev, test_dev, gen,
                                    files(train_idx, None), files(test_idx, usual_eval_transform()), workers, few,
                                    stages.next)
        for pipe in ("fervit", "usual", "usual_few"):
            add_tflops(models[name][pipe], models[name]["train_gflops_per_image"], peak)
        partial()

    # --- step modes, batch sizes, fused attention ---------------------------------------------------
    step_preset = presets[step_model]
    gflops = (models[step_model]["train_gflops_per_image"] if step_model in models
              else flops_per_image(build_model(step_preset.model), step_preset.model.in_chans,
                                   step_preset.model.img_size)[1] / 1e9)
    stages.next(f"{step_model}: step modes {', '.join(cfg.step_modes)} at batch "
                f"{', '.join(map(str, cfg.step_batches))}, and channels_last")
    result["step_model"] = step_model
    result["step_modes"] = step_rows(step_preset, cfg, device, images, labels, train_dev, gen, gflops, peak)
    head_dim = step_preset.model.embed_dim // step_preset.model.num_heads
    result["fused_attention"] = fused_attention_backend(device, head_dim=head_dim, heads=step_preset.model.num_heads)
    partial()

    for row in concurrency:
        if "images_s" in row:
            add_tflops(row, gflops, peak, key="images_s")
    partial()

    if device.type == "cpu":  # each pipeline as it really runs: its own process, its own OpenMP wait policy
        from fervit.benchmark.as_run import as_run_rows

        steps = min(cfg.train_steps or len(train_dev) // cfg.batch_size, len(train_dev) // cfg.batch_size)
        stages.next(f"training in fresh processes, under the wait policy each runs with: fervit for "
                    f"{', '.join(cfg.models)}, the usual pipeline for {step_model} ({steps} steps of {cfg.batch_size})")
        result["as_run"] = {
            name: as_run_rows(str(root), name, cfg.batch_size, steps, cfg.warmup_steps, 1 if cfg.quick else 3, workers,
                              torch.get_num_threads(), cache_dir,
                              pipelines=("fervit", "usual") if name == step_model else ("fervit",))
            for name in dict.fromkeys((*cfg.models, step_model))}
        for name, rows in result["as_run"].items():
            for row in (r for r in rows.values() if isinstance(r, dict)):
                add_tflops(row, models[name]["train_gflops_per_image"] if name in models else gflops, peak)
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


def _concurrency_mode(cfg: BenchConfig, device: torch.device) -> str:
    """On CUDA the cheapest step mode the bench runs (cuda_graph, else compile); elsewhere eager, where
    every process compiling for itself would only time the compiler."""
    if device.type != "cuda" or cfg.compile == "off":
        return "eager"
    return next((m for m in ("cuda_graph", "compile") if m in cfg.step_modes), "eager")


def _cpu_count() -> int:
    return os.cpu_count() or 1


def _kornia_version() -> str | None:
    try:
        import kornia
    except ImportError:
        return None
    return kornia.__version__
