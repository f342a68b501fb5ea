"""`fervit bench`: fervit's training pipeline side by side with the usual per-image one, in one run.

Same machine, same model, same batch size, same optimiser, same autocast and compile decision; only the
way images reach the model differs:
- fervit: the uint8 dataset resident on the device, batches indexed and augmented there
  (`augment_batch`), trained by the trainer's own `train_one_epoch`;
- usual: JPEG files decoded and augmented per image (PIL + torchvision) in DataLoader workers,
  each batch copied to the device, running metrics read back every step.
The data path alone (no model) is also timed for both, and for kornia's batched augmentation.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from fervit import __version__
from fervit.benchmark.measure import (best_seconds, bf16_peak_tflops, flops_per_image, machine_info, median_ms,
                                      peak_memory_kind, peak_memory_mib, reset_peak_memory, sync)
from fervit.benchmark.pipelines import (ImageFiles, kornia_augment, torchvision_transforms, torchvision_version,
                                        usual_eval_transform, usual_loader, usual_train_transform)
from fervit.config import AugmentConfig, RunConfig, load_preset
from fervit.data.augment import augment_batch, normalize
from fervit.data.dataset import LAYOUT_HINT, load_fer
from fervit.errors import FervitError
from fervit.evaluation.evaluate import autocast, evaluate
from fervit.models import build_model, count_parameters
from fervit.device import resolve_amp
from fervit.training.epoch import EpochParts, build_optimizer, maybe_compile, optimizer_step, train_one_epoch

FER2013_EPOCH = 28_709  # images in FER-2013's train/ folder: what "seconds per epoch" means


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
    quick: bool = False


def bench_config(device: torch.device, quick: bool = False, **overrides) -> BenchConfig:
    """The sizes for this device: whole epochs on a GPU, a few steps on a CPU, tiny ones with `quick`.

    `overrides` (None values ignored) replace single fields, e.g. `batch_size=64`.
    """
    if quick:  # a smoke run for CI: every code path, numbers only indicative
        cfg = BenchConfig(batch_size=32, eval_batch_size=64, data_images=1024, train_steps=1, eval_images=64,
                          warmup_steps=1, repeats=2, latency_runs=5, quick=True)
    elif device.type == "cuda":
        cfg = BenchConfig()
    else:  # a CPU trains a few images per second: time a few steps and extrapolate the epoch
        cfg = BenchConfig(data_images=8192, train_steps=2, eval_images=256, warmup_steps=1, repeats=2,
                          latency_runs=20)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    for name in ("batch_size", "eval_batch_size", "repeats", "latency_runs"):
        if getattr(cfg, name) < 1:
            raise FervitError(f"bench {name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("data_images", "train_steps", "eval_images", "warmup_steps", "workers"):
        if getattr(cfg, name) < 0:
            raise FervitError(f"bench {name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.compile not in ("auto", "on", "off"):
        raise FervitError(f"bench compile must be auto, on or off, got '{cfg.compile}'")
    cfg.models = tuple(cfg.models)
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
                  strict: bool = False, progress: bool = True, command: str = "") -> dict:
    """Time every pipeline on `device`; returns the result that `format_table` prints and --json writes."""
    stages = Stages(2 + 4 * len(cfg.models), progress)
    if not Path(root).exists():
        raise FervitError(f"data root '{root}' does not exist; {LAYOUT_HINT}")
    presets = {name: load_preset(name) for name in cfg.models}  # unknown names fail before any timing
    torchvision_transforms()  # so do missing extras
    kornia = kornia_augment(AugmentConfig()).to(device)
    workers = cfg.workers or _cpu_count()

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
    with _UsualBatches(files(train_idx, usual_train_transform(aug)), bs, workers, device, train=True) as usual:
        usual.take(1)  # worker start-up is not timed
        data_path["usual"] = {"images_s": batches * bs / best_seconds(lambda: usual.take(batches), cfg.repeats,
                                                                      device)}

    # --- training, evaluation and latency per model ----------------------------------------------
    models = {}
    for name in cfg.models:
        models[name] = _bench_model(name, presets[name], cfg, device, images, labels, train_dev, test_dev, gen,
                                    files(train_idx, None), files(test_idx, usual_eval_transform()), workers,
                                    stages)

    peak = bf16_peak_tflops(device)
    for row in models.values():
        for pipe in ("fervit", "usual"):
            r = row[pipe]
            r["tflops"] = row["train_gflops_per_image"] * r["train_images_s"] / 1000
            r["peak_fraction"] = r["tflops"] / peak if peak else None
    machine = machine_info(device)
    machine.update({"torchvision": torchvision_version(), "kornia": _kornia_version(), "fervit": __version__})
    return {
        "command": command,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "settings": {**dataclasses.asdict(cfg), "workers": workers, "models": list(cfg.models),
                     "amp": "bf16" if resolve_amp("auto", device) else "off",
                     "timing": f"each figure is the best of {cfg.repeats} timings after {cfg.warmup_steps} untimed "
                               "warm-up steps; epoch_s = 28,709 / train_images_s"},
        "dataset": {"root": str(root), "train_images": len(train_idx), "test_images": len(test_idx),
                    "load_s": load_s},
        "data_path": data_path,
        "data_path_ratio": data_path["fervit"]["images_s"] / data_path["usual"]["images_s"],
        "kornia_ratio": data_path["fervit"]["images_s"] / data_path["kornia"]["images_s"],
        "bf16_peak_tflops": peak,
        "peak_mem_kind": peak_memory_kind(device),
        "models": models,
    }


def _bench_model(name: str, preset: RunConfig, cfg: BenchConfig, device, images, labels, train_dev, test_dev,
                 gen, train_files: ImageFiles, test_files: ImageFiles, workers: int, stages: Stages) -> dict:
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
    optimizer = build_optimizer(model, preset, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    example = torch.zeros(bs, preset.model.in_chans, preset.model.img_size, preset.model.img_size, device=device)
    train_model = maybe_compile(model, cfg.compile, device, example)  # both pipelines train this same module

    # fervit: the trainer's own epoch function on a random subset of train/ that holds k batches
    def fervit_steps(k: int) -> None:
        subset = train_dev[torch.randperm(len(train_dev), generator=gen, device=device)[:k * bs]]
        train_one_epoch(EpochParts(preset, train_model, optimizer, scheduler, images, labels, subset, gen,
                                   amp_dtype=amp))

    reset_peak_memory(device)
    if warmup:
        fervit_steps(warmup)
    fervit = _train_row(bs * steps / best_seconds(lambda: fervit_steps(steps), cfg.repeats, device), device)

    stages.next(f"{name}: training, usual pipeline ({what}, {workers} workers)")
    train_files.transform = usual_train_transform(preset.augment)
    reset_peak_memory(device)
    with _UsualBatches(train_files, bs, workers, device, train=True) as usual:
        running = {"loss": 0.0, "correct": 0}

        def usual_steps(k: int) -> None:
            train_model.train()
            for x, y in usual.batches(k):
                with autocast(device, amp):
                    logits = train_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=preset.optim.label_smoothing)
                optimizer_step(loss, model, optimizer, scheduler, preset.optim.grad_clip)
                # the usual loop keeps its running metrics as Python numbers: a host sync every step
                running["loss"] += loss.item() * len(y)
                running["correct"] += int((logits.argmax(-1) == y).sum().item())

        if warmup:
            usual_steps(warmup)
        usual_row = _train_row(bs * steps / best_seconds(lambda: usual_steps(steps), cfg.repeats, device), device)

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
            model.eval()
            correct = 0
            for x, y in usual.epoch():
                with autocast(device, amp):
                    correct += int((model(x).argmax(-1) == y).sum().item())

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
        with autocast(device, amp):
            model(x)

    fervit["latency_ms"] = median_ms(fervit_one, cfg.latency_runs, device)
    usual_row["latency_ms"] = median_ms(usual_one, cfg.latency_runs, device)
    row = {
        "params": count_parameters(model),
        "batch_size": bs,
        "compiled": train_model is not model,
        "forward_gflops_per_image": fwd_flops / 1e9,
        "train_gflops_per_image": train_flops / 1e9,
        "fervit": fervit,
        "usual": usual_row,
        "train_ratio": fervit["train_images_s"] / usual_row["train_images_s"],
        "eval_ratio": fervit["eval_images_s"] / usual_row["eval_images_s"],
    }
    del model, train_model, optimizer
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
        f"{s['workers']} DataLoader workers; {s['timing']}",
        "",
        "data path alone (augmented images/s, no model)",
        f"  fervit  device-side, batched           {dp['fervit']['images_s']:>10,.0f}",
        f"  kornia  AugmentationSequential          {dp['kornia']['images_s']:>10,.0f}   fervit/kornia "
        f"{result['kornia_ratio']:.1f}x",
        f"  usual   PIL + torchvision per image     {dp['usual']['images_s']:>10,.0f}   fervit/usual "
        f"{result['data_path_ratio']:.1f}x",
        "",
        f"{'model':<10} {'pipeline':<13} {'train img/s':>11} {'epoch s':>9} {'eval img/s':>10} {'latency ms':>10} "
        f"{'peak MiB':>9} {'TFLOP/s':>8}",
    ]
    for name, row in result["models"].items():
        for pipe in ("fervit", "usual"):
            r = row[pipe]
            lines.append(f"{name if pipe == 'fervit' else '':<10} {pipe:<13} {r['train_images_s']:>11,.1f} "
                         f"{r['epoch_s']:>9,.1f} {r['eval_images_s']:>10,.1f} {r['latency_ms']:>10.2f} "
                         f"{r['peak_mem_mib']:>9,.0f} {r['tflops']:>8.3f}")
        lines.append(f"{'':<10} {'fervit/usual':<13} {row['train_ratio']:>10.2f}x {'':>9} {row['eval_ratio']:>9.2f}x")
    lines.append("")
    peak = result["bf16_peak_tflops"]
    for name, row in result["models"].items():
        achieved = (f"; fervit trains at {row['fervit']['tflops']:.1f} TFLOP/s, "
                    f"{row['fervit']['peak_fraction']:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else "")
        lines.append(f"{name}: {row['params'] / 1e6:.2f}M parameters, {row['forward_gflops_per_image']:.3f} GFLOP "
                     f"forward / {row['train_gflops_per_image']:.3f} GFLOP train per image, "
                     f"{'compiled' if row['compiled'] else 'eager'}{achieved}")
    if not peak:
        lines.append("bf16 peak: not known for this device")
    lines.append(f"peak memory: {result['peak_mem_kind']}")
    return "\n".join(lines)
