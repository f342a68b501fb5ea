"""One model's rows: training, evaluation and single-image latency, fervit's pipeline beside the usual one."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from fervit.benchmark.config import BenchConfig
from fervit.benchmark.harness import PhasedTrainStep as TrainStep
from fervit.benchmark.measure import (best_seconds, flops_per_image, median_ms, reset_peak_memory, train_row)
from fervit.benchmark.pipelines import (ImageFiles, UsualBatches, usual_cpu_parts, usual_train_transform,
                                        usual_training)
from fervit.benchmark.step_modes import step_breakdown
from fervit.config import RunConfig
from fervit.data.images import normalize
from fervit.device import autocast, channels_last_choice, resolve_amp
from fervit.evaluation.evaluate import evaluate
from fervit.models import build_model, count_parameters
from fervit.training.epoch import EpochBatches, train_one_epoch
from fervit.training.parts import build_optimizer, maybe_compile

BREAKDOWN_STEPS = 50  # steps per phase breakdown: enough for a stable mean, a small profiler trace


def bench_model(name: str, preset: RunConfig, cfg: BenchConfig, device, images, labels, train_dev, test_dev,
                 gen, train_files: ImageFiles, test_files: ImageFiles, workers: int, few: int, stage: Callable[[str], None]) -> dict:
    """Train, evaluate and single-image latency for one model, fervit's pipeline then the usual one."""
    bs = cfg.batch_size
    steps = min(cfg.train_steps or len(train_dev) // bs, len(train_dev) // bs)
    warmup = min(cfg.warmup_steps, steps)
    what = f"{steps} steps of {bs}, best of {cfg.repeats}"
    compiling = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    stage(f"{name}: model set-up{' and torch.compile' if compiling else ''}, training with the fervit "
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
    side = preset.model.trained_side()  # what training feeds the model
    example = torch.zeros(bs, preset.model.in_chans, side, side, device=device)
    train_model = maybe_compile(model, cfg.compile, device, example)  # on CUDA both pipelines train this module
    # one step for the whole bench, as the trainer builds one per run; the breakdown below times it too
    step = TrainStep(train_model, optimizer, scheduler, preset, amp_dtype=amp, channels_last=channels_last)

    # fervit: the trainer's own epoch function on a random subset of train/ that holds k batches
    def fervit_steps(k: int) -> None:
        subset = train_dev[torch.randperm(len(train_dev), generator=gen, device=device)[:k * bs]]
        train_one_epoch(step, EpochBatches(images, labels, subset, gen))

    reset_peak_memory(device)
    if warmup:
        fervit_steps(warmup)
    fervit = train_row(bs * steps / best_seconds(lambda: fervit_steps(steps), cfg.repeats, device), device)

    stage(f"{name}: training, usual pipeline ({what}, {workers} workers)")
    train_files.transform = usual_train_transform(preset)
    # the usual script on a CPU: fp32 and NCHW, its own model (fervit's step made this one channels_last);
    # on CUDA it keeps the same module and autocast, so there the pipelines differ only in how images arrive
    usual_amp, usual_model, usual_train = amp, model, train_model
    usual_optimizer, usual_scheduler = optimizer, scheduler
    if device.type == "cpu":
        usual_model, usual_optimizer, usual_scheduler = usual_cpu_parts(preset, device)
        usual_amp, usual_train = None, usual_model
    usual_rows = {}
    for key, n_workers in (("usual", workers), ("usual_few", few)):
        if key == "usual_few" and n_workers == workers:  # the same measurement again: keep the first one
            usual_rows[key] = dict(usual_rows["usual"])
            continue
        if key == "usual_few":
            stage(f"{name}: training, usual pipeline ({what}, {n_workers} workers)")
        reset_peak_memory(device)
        with UsualBatches(train_files, bs, n_workers, device, train=True) as usual:
            usual_steps = usual_training(usual, usual_train, usual_model, usual_optimizer, usual_scheduler, preset,
                                         usual_amp)
            if warmup:
                usual_steps(warmup)
            usual_rows[key] = train_row(bs * steps / best_seconds(lambda: usual_steps(steps), cfg.repeats, device),
                                         device)
            usual_rows[key]["workers"] = n_workers
    usual_row = usual_rows["usual"]

    # evaluation: the trainer evaluates the eager model; the usual loop reads its accuracy per batch
    n_eval = min(cfg.eval_images or len(test_dev), len(test_dev))
    stage(f"{name}: evaluation of {n_eval} test/ images, both pipelines, best of {cfg.repeats}")
    eval_idx = test_dev[:n_eval]
    evaluate(model, images, labels, eval_idx[:cfg.eval_batch_size], cfg.eval_batch_size, amp)  # warm-up
    fervit["eval_images_s"] = n_eval / best_seconds(
        lambda: evaluate(model, images, labels, eval_idx, cfg.eval_batch_size, amp), cfg.repeats, device)
    eval_files = copy.copy(test_files)
    eval_files.paths, eval_files.labels = test_files.paths[:n_eval], test_files.labels[:n_eval]
    with UsualBatches(eval_files, cfg.eval_batch_size, workers, device, train=False) as usual:

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
    stage(f"{name}: single-image latency, median of {cfg.latency_runs}")
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
        # what fervit's evaluation did before it chose bf16 and channels_last on a CPU: fp32, NCHW weights
        nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        fervit["eval_fp32_nchw_images_s"] = n_eval / best_seconds(
            lambda: evaluate(nchw, images, labels, eval_idx, cfg.eval_batch_size, None), cfg.repeats, device)
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
    stage(f"{name}: step breakdown ({'compiled' if row['compiled'] else 'eager'} model, {steps} steps of {bs})")
    step(images[train_dev[:bs]], labels[train_dev[:bs]], gen)  # warm-up
    row["breakdown"] = step_breakdown(step, images, labels, train_dev, gen, min(steps, BREAKDOWN_STEPS), device)
    row["breakdown"]["model_compiled"] = row["compiled"]
    del model, train_model, optimizer, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row
