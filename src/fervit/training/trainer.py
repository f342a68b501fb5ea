"""Training: the dataset lives on the device as uint8; batches are indexed and augmented there.

`train` reads top to bottom: check the request, lock the run folder, load the data, open the run folder,
set up (`set_up`: model, optimiser, schedule, EMA, maybe a resumed state, `extend`ed to more epochs), then
`run_epoch` until done, then `finish` (reload the best model, evaluate val and test, write results). `set_up`
builds the step (fervit.training.step) once and `run_epoch` hands it to `train_one_epoch` (fervit.training.epoch).
The run folder is always finished, also after Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from fervit import omp
from fervit.config import RunConfig
from fervit.data.dataset import CLASSES, FerData, load_fer
from fervit.data.location import resolve_data_root
from fervit.data.splits import Splits, make_splits
from fervit.device import amp_choice, channels_last_choice, resolve_device
from fervit.errors import FervitError
from fervit.evaluation.sharded import evaluate_sharded
from fervit.io import make_folder
from fervit.models import build_model, count_parameters
from fervit.models.checkpoint import describe, save_model
from fervit.models.pretrained import load_pretrained
from fervit.run_folder import (WEIGHTS, has_results, is_run_folder, make_run_dir, read_config, set_results_aside,
                               write_config, write_metrics)
from fervit.training.budget import fit_time_budget
from fervit.training.checkpoint import (CheckpointWriter, ResumeState, has_checkpoint, load_last, restore,
                                        restore_rng)
from fervit.training.distributed import (DistContext, any_rank, barrier, broadcast_value, close, init_distributed,
                                        wrap_model)
from fervit.training.epoch import (EpochBatches, check_self_distill, first_soft_targets, self_distill_weight,
                                   train_one_epoch)
from fervit.training.finish import finish
from fervit.training.lock import RunLock
from fervit.training.parts import build_ema, build_optimizer, class_weights, maybe_compile
from fervit.training.recipe import check_config, check_continuable, data_fingerprint
from fervit.training.resolution import check_low_res, set_epoch_side
from fervit.training.signals import Preempted, StopNow, StopSignals
from fervit.training.step import TrainStep
from fervit.training.teachers import check_teachers, load_teachers
from fervit.training.schedule import WarmupCosine, WarmupPlateau, apply_now, build_schedule
from fervit.training.tensorboard import TensorBoardLog
from fervit.training.watch import EpochBar, Figures, PlanCheck


@dataclass
class TrainState:
    """Where a run stands between two epochs, apart from tensors: what resume saves and restores whole."""

    epochs: int  # planned; the time budget may lower it from epoch 2 on
    epoch: int = 0  # epochs finished
    rows: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    best_acc: float = -1.0
    best_epoch: int = 0
    stale: int = 0  # epochs since the best one
    stop_reason: str = ""  # set by early stopping or the sweep's pruner
    elapsed_s: float = 0.0  # wall time so far, over every resume
    budgeted: bool = True  # train.time_budget_s still applies (not after `--resume --epochs N` extended the run)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class Run:
    """Everything `set_up` builds once: the run folder, the data on the device and the training parts."""

    cfg: RunConfig
    ctx: DistContext
    run_dir: Path
    data: FerData
    splits: Splits
    fingerprint: str  # of labels and splits: a resumed run must see the same examples
    model: nn.Module  # plain, on the device
    eval_model: nn.Module  # the EMA's copy when there is one, else `model`
    step: TrainStep  # built once; it holds the training module, optimiser, scheduler and EMA
    batches: EpochBatches  # the dataset on the device, and how an epoch draws from it
    schedule: WarmupCosine | WarmupPlateau
    steps_per_epoch: int
    val_idx: torch.Tensor
    n_params: int
    log: Callable
    quiet: bool
    runtime: dict = field(default_factory=dict)  # precision, memory layout and threads chosen, and why


def train(cfg: RunConfig, quiet: bool = False, data: FerData | None = None, *, run_dir: str | Path | None = None,
          resume: bool = False, ctx: DistContext | None = None,
          on_epoch: Callable[[dict], str | None] | None = None) -> Path:
    """Train one model as configured; returns the finished run folder.

    `run_dir`: write into this folder instead of a new one under train.output. `resume`: continue the run
    in `run_dir` from its `last` checkpoint (one without a checkpoint restarts at epoch 1, which is exact); a
    cfg.train.epochs other than the run's extends or re-plans it, also a finished run. The run folder is
    locked while training (RunLock): another process training into it is a one-line FervitError.
    `ctx`: the process group; by default read from the torchrun/srun environment. `on_epoch(row)` runs on
    rank 0 after each epoch and may return a reason to stop early (a sweep's pruner does).
    On SIGTERM/SIGUSR1 the epoch in flight finishes, the checkpoint is written and Preempted is raised.
    """
    t_start = time.time()
    ctx = ctx or init_distributed(cfg.train.device, resolve_device)
    lock = RunLock()
    try:
        with StopSignals() as signals:
            try:
                return _train(cfg, quiet, data, run_dir, resume, ctx, on_epoch, signals, lock, t_start)
            except StopNow as e:
                run_dir = signals.run_dir
                raise Preempted(f"{e}: stopped at once, mid-epoch; continue from the previous epoch's checkpoint "
                                f"with `fervit train --resume {run_dir}`" if run_dir else
                                f"{e}: stopped before training began; run the same command again", run_dir) from None
    finally:
        lock.release()
        close(ctx)


def _train(cfg: RunConfig, quiet: bool, data: FerData | None, run_dir, resume: bool, ctx: DistContext,
           on_epoch, signals: StopSignals, lock: RunLock, t_start: float) -> Path:
    check_request(cfg, ctx, run_dir, resume)
    # the run folder, its checkpoint and its recipe are checked before the data is read: a refusal is at once
    lock.acquire(run_dir, ctx)  # a folder in use says so first, not that its recipe differs
    log = print if not quiet and ctx.is_main else (lambda *a: None)
    saved = load_last(run_dir) if resume else None
    if resume:
        check_config(saved.meta["config"] if saved is not None else read_config(run_dir, "resume").to_dict(), cfg,
                     Path(run_dir))
    data, splits = load_data(cfg, data, ctx, quiet)
    fingerprint = data_fingerprint(data.labels, splits)
    if saved is not None:
        check_continuable(saved, cfg, ctx, fingerprint, Path(run_dir))
    elif resume:
        log(f"{run_dir} has no checkpoint yet: starting it from epoch 1, which is where it was")
    run_dir = open_run_dir(cfg, ctx, run_dir, lock, fresh=saved is None)
    signals.run_dir = run_dir
    run = set_up(cfg, ctx, data, splits, fingerprint, saved, run_dir, log, quiet)
    state = TrainState(epochs=cfg.train.epochs)
    if saved is not None:
        state = resume_state(run, saved)
        t_start = time.time() - state.elapsed_s
    tb = TensorBoardLog(run.run_dir, CLASSES, start_epoch=state.epoch, enabled=ctx.is_main)
    watch = Figures(run.run_dir, CLASSES)
    checkpoints = CheckpointWriter()
    interrupted = False
    try:
        while state.epoch < state.epochs and not state.stop_reason:
            row = run_epoch(run, state, tb, watch)
            plan_next(run, state, row, t_start, on_epoch)
            preempted = any_rank(bool(signals.requested), ctx)
            state.elapsed_s = time.time() - t_start
            checkpoints.save(run.run_dir, ctx, cfg, model=run.model, ema=run.step.ema, optimizer=run.step.optimizer,
                             scheduler=run.step.scheduler, gen=run.batches.gen, progress=state.to_dict(),
                             fingerprint=fingerprint, soft=run.batches.soft)
            if preempted:
                checkpoints.wait()
                tb.close()
                raise Preempted(f"{signals.requested or 'a stop signal to another rank'}: stopped after epoch "
                                f"{state.epoch} with a checkpoint; continue with `fervit train --resume "
                                f"{run.run_dir}`", run.run_dir, state.epoch)
            if state.stop_reason:
                log(state.stop_reason)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: finishing the run folder with the best checkpoint so far")
    except StopNow:
        checkpoints.wait()  # the previous epoch's checkpoint is what a resume continues from
        raise
    checkpoints.wait()
    tb.close()
    return finish(run, state, interrupted, t_start)


def check_request(cfg: RunConfig, ctx: DistContext, run_dir, resume: bool) -> None:
    """Seed the RNGs, and one-line errors for a request that cannot run (before any data is read)."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    if ctx.enabled and ctx.device.type == "cuda":
        torch.cuda.manual_seed(cfg.train.seed + ctx.rank)  # own dropout masks per rank; the CPU RNG stays shared
    if ctx.enabled and cfg.train.batch_size % ctx.world_size:
        raise FervitError(f"train.batch_size {cfg.train.batch_size} is the global batch and must split evenly "
                          f"over {ctx.world_size} processes; choose a multiple of {ctx.world_size}")
    if resume:
        if run_dir is None or not is_run_folder(run_dir):
            raise FervitError(f"cannot resume '{run_dir}': it is not a run folder written by `fervit train` "
                              "(no config.json)")
        if has_results(run_dir) and not has_checkpoint(run_dir):
            raise FervitError(f"{run_dir} has already finished (results.json is written) and has no last/ checkpoint "
                              "to train it further from; start a new run instead")
    check_teachers(cfg)
    check_self_distill(cfg, ctx.world_size)
    check_low_res(cfg)
    if cfg.train.tta == "ten_crop" and not cfg.model.takes_crops():  # now, not after training
        raise FervitError(f"train.tta=ten_crop needs a model trained on crops smaller than the {cfg.model.img_size}px "
                          "face (model.crop_size, e.g. 40); use train.tta=mirror for a model that takes the whole face")


def load_data(cfg: RunConfig, data: FerData | None, ctx: DistContext, quiet: bool) -> tuple[FerData, Splits]:
    """The decoded dataset (rank 0 decodes and caches it first) and its train/val/test split."""
    if data is None:
        cfg.data.root = resolve_data_root(cfg.data.root)
        if not ctx.is_main:  # rank 0 decodes and writes the cache first; the others then read it
            barrier(ctx)
        data = load_fer(cfg.data.root, cfg.data.cache_dir or None, cfg.data.strict, progress=not quiet and ctx.is_main)
        if ctx.is_main:
            barrier(ctx)
    splits = make_splits(data, cfg.data.protocol, cfg.data.val_fraction, cfg.data.split_seed,
                         cfg.data.drop_eval_duplicates)
    for name, size in splits.sizes().items():
        if size == 0:
            raise FervitError(f"the {cfg.data.protocol} protocol leaves the {name} split empty for this data")
    return data, splits


def set_up(cfg: RunConfig, ctx: DistContext, data: FerData, splits: Splits, fingerprint: str,
           saved: ResumeState | None, run_dir: Path, log, quiet: bool) -> Run:
    """Build the model, move the data to the device, build optimiser, schedule and EMA, restore a saved state
    into them, and compile. The order is fixed: each step may draw random numbers."""
    device = ctx.device
    model = build_model(cfg.model)
    if cfg.model.pretrained and saved is None:
        load_pretrained(model, cfg.model.pretrained, log)
    n_params = count_parameters(model)
    log(f"{cfg.model.name}: {n_params:,} parameters | device {device}"
        f"{f' x {ctx.world_size} processes' if ctx.enabled else ''} | protocol {cfg.data.protocol} "
        f"{splits.sizes()} | run {run_dir}")
    model.to(device)
    images, labels = data.images.to(device), data.labels.to(device)
    train_idx, val_idx = splits.train.to(device), splits.val.to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    steps_per_epoch = max(len(train_idx) // cfg.train.batch_size, 1)
    train_labels = labels[train_idx]
    optimizer = build_optimizer(model, cfg, device)
    weights = class_weights(train_labels, cfg.model.num_classes)
    ema = build_ema(model, cfg)
    soft = first_soft_targets(labels, cfg, log)
    schedule = build_schedule(cfg.optim, steps_per_epoch, cfg.train.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype, amp_why = amp_choice(cfg.train.amp, device)
    channels_last, layout_why = channels_last_choice(cfg.train.channels_last, model, device)
    if channels_last and ema is not None:
        ema.module.to(memory_format=torch.channels_last)  # the live model is converted by the TrainStep
    runtime = {"amp": "bf16" if amp_dtype else "off", "amp_why": amp_why,
               "channels_last": channels_last, "channels_last_why": layout_why,
               "threads": torch.get_num_threads() if device.type == "cpu" else None, "omp_wait": omp.describe()}
    cpu = f" | {runtime['threads']} CPU threads (train.threads), OpenMP {runtime['omp_wait']}"
    log(f"precision {'bf16 autocast' if amp_dtype else 'fp32'} ({amp_why}) | channels_last "
        f"{'on' if channels_last else 'off'} ({layout_why})" + (cpu if device.type == "cpu" else ""))
    if saved is not None:
        restore(saved, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, run_dir=run_dir, ctx=ctx,
                soft=soft)
    side = cfg.model.trained_side()  # what training feeds the model
    example = torch.zeros(cfg.train.batch_size // ctx.world_size, cfg.model.in_chans, side, side, device=device)
    train_model = wrap_model(model, ctx)
    if cfg.train.step_mode == "auto":  # the whole model compiled (train.compile), the step around it eager
        train_model = maybe_compile(train_model, cfg.train.compile, device, example)
    teachers = load_teachers(cfg, device, channels_last, amp_dtype, log)
    # after the EMA is restored: the step reads its update count once
    step = TrainStep(train_model, optimizer, scheduler, cfg, ema=ema, amp_dtype=amp_dtype,
                     loss_weights=weights if cfg.optim.class_weights == "balanced" else None,
                     mode="eager" if cfg.train.step_mode == "auto" else cfg.train.step_mode,
                     channels_last=channels_last, rank=ctx.rank, world=ctx.world_size, teachers=teachers)
    batches = EpochBatches(images, labels, train_idx, gen,
                           sample_weights=weights[train_labels] if cfg.optim.sampler == "balanced" else None, soft=soft)
    return Run(cfg, ctx, run_dir, data, splits, fingerprint, model, ema.module if ema is not None else model, step,
               batches, schedule, steps_per_epoch, val_idx, n_params, log, quiet, runtime)


def open_run_dir(cfg: RunConfig, ctx: DistContext, run_dir, lock: RunLock, fresh: bool) -> Path:
    """The run folder (a new one under train.output unless given), locked, with config.json for a fresh run."""
    if ctx.is_main:
        if run_dir is None:
            run_dir = make_run_dir(cfg.train.output, cfg)
        make_folder(run_dir)  # a read-only place is one line
    run_dir = Path(broadcast_value(str(run_dir), ctx))
    lock.acquire(run_dir, ctx)  # a no-op when `_train` locked it already
    if fresh and ctx.is_main:
        write_config(run_dir, cfg)
    return run_dir


def resume_state(run: Run, saved: ResumeState) -> TrainState:
    """The saved TrainState; the RNGs go back last (building and compiling drew random numbers)."""
    state = TrainState.from_dict(saved.progress)
    restore_rng(saved, run.batches.gen, run.ctx)
    if run.ctx.is_main:  # forget an epoch a killed process logged after its last checkpoint
        write_metrics(run.run_dir, state.rows)
    run.log(f"resuming after epoch {state.epoch}/{state.epochs}")
    if run.cfg.train.epochs != saved.planned_epochs:
        extend(run, state)
    return state


def extend(run: Run, state: TrainState) -> None:
    """`--epochs N` on resume: train to N epochs in all. A cosine takes, for the steps left, the values of the
    cosine planned for N epochs from the start; a plateau schedule just continues. A stop by early stopping or
    the sweep's pruner is lifted (early stopping still counts the epochs since the best one), and so is the
    time budget: the run trains the epochs asked for."""
    state.epochs, state.stop_reason, state.budgeted = run.cfg.train.epochs, "", False
    run.schedule.replan(run.steps_per_epoch * state.epochs)
    apply_now(run.step.scheduler)  # the next step already takes the new plan's lr
    if run.ctx.is_main:  # so that a plain --resume after a stop continues to N
        cfg = read_config(run.run_dir, "extend")
        cfg.train.epochs = state.epochs
        write_config(run.run_dir, cfg)
        set_results_aside(run.run_dir, state.epoch)
    run.log(f"training to {state.epochs} epochs (lr now {run.step.optimizer.param_groups[0]['lr']:.2e})")


def run_epoch(run: Run, state: TrainState, tb: TensorBoardLog, watch: Figures | None = None) -> dict:
    """Train one epoch, validate, keep the best model, log, redraw the figures (`watch`); returns the epoch's
    metrics row."""
    cfg, ctx, step, batches = run.cfg, run.ctx, run.step, run.batches
    state.epoch += 1
    t0 = time.time()
    # the plan's length is judged on the first steps of a run's first epoch (not again on a resume)
    plan = PlanCheck(state.epochs, run.steps_per_epoch, ctx.device.type, cfg.train.time_budget_s) \
        if state.epoch == 1 and ctx.is_main else None
    scheduler = step.scheduler
    first_step = scheduler.last_epoch
    batches.soft_weight = self_distill_weight(cfg.optim.self_distill, state.epoch, state.epochs)
    set_epoch_side(step, cfg, state.epoch, state.epochs, run.log)
    with EpochBar(len(batches.train_idx), f"epoch {state.epoch}/{state.epochs}", run.quiet or not ctx.is_main,
                  plan) as bar:
        lr = step.optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(step, batches, bar, ctx=ctx if ctx.enabled else None)
    # the highest lr of the epoch's steps: the first one's is misleading in the warm-up (epoch 1 starts near 0)
    peak_lr = max(base * fn(s) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)
                  for s in range(first_step, max(scheduler.last_epoch, first_step + 1)))
    val = evaluate_split(run.eval_model, batches.images, batches.labels, run.val_idx, cfg, step.amp_dtype, ctx)
    row = {"epoch": state.epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
           "val_loss": val["loss"], "val_acc": val["acc"], "seconds": time.time() - t0}
    if cfg.train.log_test:  # reported only (time to an accuracy); never read by anything that chooses
        test_idx = run.splits.test.to(batches.images.device)
        row["test_acc"] = evaluate_split(run.eval_model, batches.images, batches.labels, test_idx, cfg, step.amp_dtype,
                                         ctx)["acc"]
    state.rows.append(row)
    if run.schedule.epoch_end(val["acc"]):  # a plateau drop
        apply_now(scheduler)
    improved = val["acc"] > state.best_acc
    if improved:
        state.best_acc, state.best_epoch, state.stale = val["acc"], state.epoch, 0
        if ctx.is_main:
            save_model(run.eval_model, describe(cfg.model, cfg.data, epoch=state.epoch, val_acc=val["acc"]),
                       run.run_dir / WEIGHTS)
    else:
        state.stale += 1
    if ctx.is_main:
        write_metrics(run.run_dir, state.rows)
        tb.epoch(row, val["confusion"])
        if watch is not None:
            watch.epoch(state.rows, val["confusion"])
    run.log(f"epoch {state.epoch:3d}/{state.epochs} peak lr {peak_lr:.2e} | train loss {tr['loss']:.4f} acc "
            f"{tr['acc']:.4f} | val loss {val['loss']:.4f} acc {val['acc']:.4f}{' *' if improved else ''} | {row['seconds']:.1f}s")
    return row


def plan_next(run: Run, state: TrainState, row: dict, t_start: float, on_epoch) -> None:
    """After an epoch: fit the time budget (from epoch 2 on), early stopping, and the sweep's pruner."""
    cfg = run.cfg
    if cfg.train.time_budget_s > 0 and state.budgeted and state.epoch >= 2:
        fit_time_budget(run, state, t_start)
    if cfg.train.early_stop_patience and state.stale >= cfg.train.early_stop_patience:
        state.stop_reason = f"early stop: no better validation accuracy for {state.stale} epochs"
    if on_epoch is not None:
        state.stop_reason = broadcast_value((on_epoch(row) if run.ctx.is_main else None) or state.stop_reason, run.ctx)


def evaluate_split(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                   cfg: RunConfig, amp_dtype, ctx: DistContext) -> dict:
    """Loss, accuracy and confusion matrix of one split, scored by every rank together under DDP."""
    return evaluate_sharded(model, images, labels, indices, cfg.train.eval_batch_size, amp_dtype,
                            cfg.model.num_classes, ctx.rank, ctx.world_size)
