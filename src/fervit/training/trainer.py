"""Training: the dataset lives on the device as uint8; batches are indexed and augmented there.

`train_one_epoch` and `evaluate` are the two halves; `train` wires data, model, optimiser and the
run folder together and always finishes the run folder, also after Ctrl-C.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fervit.config import RunConfig, resolve_data_root
from fervit.data.augment import augment_batch, mix_batch, tta_mode
from fervit.data.dataset import CLASSES, FerData, load_fer
from fervit.data.splits import Splits, make_splits
from fervit.errors import FervitError
from fervit.evaluation.evaluate import autocast, evaluate, split_report
from fervit.evaluation.metrics import confusion_matrix
from fervit.evaluation.plots import curves_png
from fervit.io import write_json
from fervit.models import build_model, count_parameters, model_label
from fervit.runs import make_run_dir, write_metrics_csv
from fervit.training.checkpoint import WEIGHTS_NAME, load_model, save_model, unwrap
from fervit.training.distributed import (DistContext, all_reduce_sum, any_rank, barrier, broadcast_value, close,
                                        init_distributed, wrap_model)
from fervit.training.resume import (CheckpointWriter, Preempted, StopNow, StopSignals, data_fingerprint,
                                    has_checkpoint, load_last, remove_last, restore, restore_rng, validate)
from fervit.training.tensorboard import TensorBoardLog


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FervitError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FervitError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "bf16":
        return torch.bfloat16
    if name == "off":
        return None
    raise FervitError(f"train.amp must be auto, bf16 or off, got '{name}'")


class WarmupCosine:
    """Linear warmup to 1, then cosine decay to min_ratio, as a multiplier of the base lr.

    `total_steps` may be lowered mid-run (time budget): the cosine then re-plans from where it is.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float):
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced dataset gets weight 1 everywhere."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, the [CLS] token and positional embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=device.type == "cuda")


def optimizer_step(objective: torch.Tensor, model: nn.Module, optimizer, scheduler, grad_clip: float) -> None:
    """Backward, optional gradient clipping, then one optimiser and one per-step schedule step."""
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()


def train_one_epoch(model, ema, images, labels, train_idx, optimizer, scheduler, cfg: RunConfig, gen,
                    amp_dtype, loss_weights, sample_weights=None, bar=None, ctx: DistContext | None = None) -> dict:
    """One pass over a fresh permutation (or balanced draw) of train_idx; metrics stay on device.

    Under DDP (`ctx`) every rank draws the same permutation and augments the whole global batch, so the
    shared generator stays in lockstep and the recipe is the single-process one; each rank then trains on
    its slice, and the returned metrics are summed over ranks.
    """
    model.train()
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    device = images.device
    n = len(train_idx)
    if sample_weights is not None:
        order = train_idx[torch.multinomial(sample_weights, n, replacement=True, generator=gen)]
    else:
        order = train_idx[torch.randperm(n, generator=gen, device=device)]
    bs = cfg.train.batch_size
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    mixing = cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0
    # drop the last partial batch: equal shapes keep compiled graphs static, and the order is fresh each epoch
    n_used = n if n <= bs else n - n % bs
    for step, start in enumerate(range(0, n_used, bs)):
        idx = order[start:start + bs]
        y = labels[idx]
        x = augment_batch(images[idx], cfg.augment, gen, cfg.model.crop_size)  # (B, 1, S, S) float32
        target = y
        if mixing:
            x, target = mix_batch(x, y, cfg.augment, cfg.model.num_classes, gen)
        y_all = y
        if world > 1:
            x, target, y = (t.tensor_split(world)[rank] for t in (x, target, y))
        with autocast(device, amp_dtype):
            logits = model(x)
        if world == 1:
            loss = F.cross_entropy(logits.float(), target, weight=loss_weights,
                                   label_smoothing=cfg.optim.label_smoothing)
            objective = loss
        else:
            loss = shard_loss(logits.float(), target, y_all, loss_weights, cfg.optim.label_smoothing)
            objective = loss * world  # DDP averages gradients over ranks; the shares must add up instead
        optimizer_step(objective, model, optimizer, scheduler, cfg.optim.grad_clip)
        if ema is not None:
            ema.update_parameters(unwrap(model))
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(-1) == y).sum()
        if bar is not None:
            bar.update(len(idx))
            if device.type == "cpu" and world == 1 and step % 10 == 0:  # a cheap read on CPU; on GPU per epoch
                seen = start + len(idx)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{float(correct) / seen:.3f}")
    if world > 1:
        totals = all_reduce_sum(torch.stack([loss_sum.double(), correct.double()]), ctx)
        loss_sum, correct = totals[0], totals[1]
    return {"loss": float(loss_sum) / n_used, "acc": float(correct) / n_used}


def shard_loss(logits, target, y_global, loss_weights, label_smoothing: float) -> torch.Tensor:
    """This rank's share of the global batch's mean loss: the shares of all ranks add up to exactly the
    loss one process would compute on the whole batch (also with class weights, whose mean divides by the
    summed weights of the global batch's labels)."""
    total = F.cross_entropy(logits, target, weight=loss_weights, label_smoothing=label_smoothing, reduction="sum")
    hard = target.dtype == torch.long
    denom = loss_weights[y_global].sum() if hard and loss_weights is not None else len(y_global)
    return total / denom


def maybe_compile(model: nn.Module, mode: str, device: torch.device, example: torch.Tensor) -> nn.Module:
    """torch.compile the model, proven by one forward+backward; any failure falls back to eager."""
    if mode not in ("auto", "on", "off"):
        raise FervitError(f"train.compile must be auto, on or off, got '{mode}'")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return model
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}  # the trial step must not train
    try:
        compiled = torch.compile(model)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            compiled(example).float().sum().backward()
        return compiled
    except Exception as e:  # compile is an optimisation: fall back to eager, loudly
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training eagerly",
                      stacklevel=2)
        return model
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(snapshot)


def split_settings(cfg: RunConfig) -> dict:
    """What rebuilds this run's train/val/test split; kept in the checkpoint's JSON so that a checkpoint
    moved out of its run folder is still evaluated on images it never trained on."""
    d = cfg.data
    return {"protocol": d.protocol, "val_fraction": d.val_fraction, "split_seed": d.split_seed,
            "drop_eval_duplicates": d.drop_eval_duplicates}


def load_pretrained(model: nn.Module, path: str, log=print) -> None:
    """Load matching weights from a local .safetensors file (a fervit checkpoint or a bare state dict)."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise FervitError(f"model.pretrained '{p}' does not exist; give a local .safetensors file")
    if p.suffix != ".safetensors":
        raise FervitError(f"model.pretrained '{p}' is not a .safetensors file; fervit never loads pickled weights")
    if hasattr(model, "load_pretrained"):  # e.g. a timm backbone: its own loader adapts stem, head and positions
        model.load_pretrained(p, log)
        return
    try:
        state = load_file(p)
    except Exception as e:
        raise FervitError(f"model.pretrained '{p}' is not a readable safetensors file ({e})") from None
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise FervitError(f"no tensor in '{p}' matches this model's names and shapes; is it a checkpoint of "
                          "another architecture?")
    model.load_state_dict(usable, strict=False)
    log(f"loaded {len(usable)}/{len(own)} tensors from {p}")


def train(cfg: RunConfig, quiet: bool = False, data: FerData | None = None, *, run_dir: str | Path | None = None,
          resume: bool = False, ctx: DistContext | None = None,
          on_epoch: Callable[[dict], str | None] | None = None) -> Path:
    """Train one model as configured; returns the finished run folder.

    `run_dir`: write into this folder instead of a new one under train.output. `resume`: continue the run
    in `run_dir` from its `last` checkpoint (one without a checkpoint restarts at epoch 1, which is exact).
    `ctx`: the process group; by default read from the torchrun/srun environment. `on_epoch(row)` runs on
    rank 0 after each epoch and may return a reason to stop early (a sweep's pruner does).
    On SIGTERM/SIGUSR1 the epoch in flight finishes, the checkpoint is written and Preempted is raised.
    """
    t_start = time.time()
    ctx = ctx or init_distributed(cfg.train.device, resolve_device)
    try:
        with StopSignals() as signals:
            try:
                return _train(cfg, quiet, data, run_dir, resume, ctx, on_epoch, signals, t_start)
            except StopNow as e:
                run_dir = signals.run_dir
                raise Preempted(f"{e}: stopped at once, mid-epoch; continue from the previous epoch's checkpoint "
                                f"with `fervit train --resume {run_dir}`" if run_dir else
                                f"{e}: stopped before training began; run the same command again", run_dir) from None
    finally:
        close(ctx)


def _train(cfg: RunConfig, quiet: bool, data: FerData | None, run_dir, resume: bool, ctx: DistContext,
           on_epoch, signals: StopSignals, t_start: float) -> Path:
    device = ctx.device
    amp_dtype = resolve_amp(cfg.train.amp, device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    if ctx.enabled and device.type == "cuda":
        torch.cuda.manual_seed(cfg.train.seed + ctx.rank)  # own dropout masks per rank; the CPU RNG stays shared
    if ctx.enabled and cfg.train.batch_size % ctx.world_size:
        raise FervitError(f"train.batch_size {cfg.train.batch_size} is the global batch and must split evenly "
                          f"over {ctx.world_size} processes; choose a multiple of {ctx.world_size}")
    if resume:
        if run_dir is None or not (Path(run_dir) / "config.json").is_file():
            raise FervitError(f"cannot resume '{run_dir}': it is not a run folder written by `fervit train` "
                              "(no config.json)")
        if (Path(run_dir) / "results.json").is_file() and not has_checkpoint(run_dir):
            raise FervitError(f"{run_dir} has already finished (results.json is written); start a new run instead")
    log = print if not quiet and ctx.is_main else (lambda *a: None)
    try:
        tta = tta_mode(cfg.train.tta)
    except ValueError as e:
        raise FervitError(f"train.tta: {e}") from None
    if tta == "ten_crop" and not cfg.model.crop_size:  # fail now, not after training
        raise FervitError("train.tta=ten_crop needs a model trained on crops (model.crop_size, e.g. 40); "
                          "use train.tta=mirror for a model that takes the whole face")
    if data is None:
        root = resolve_data_root(cfg.data.root)
        cfg.data.root = root
        if not ctx.is_main:  # rank 0 decodes and writes the cache first; the others then read it
            barrier(ctx)
        data = load_fer(root, cfg.data.cache_dir or None, cfg.data.strict, progress=not quiet and ctx.is_main)
        if ctx.is_main:
            barrier(ctx)
    splits = make_splits(data, cfg.data.protocol, cfg.data.val_fraction, cfg.data.split_seed,
                         cfg.data.drop_eval_duplicates)
    for name, size in splits.sizes().items():
        if size == 0:
            raise FervitError(f"the {cfg.data.protocol} protocol leaves the {name} split empty for this data")
    fingerprint = data_fingerprint(data.labels, splits)
    state = None
    if resume:
        state = load_last(run_dir)
        if state is not None:
            validate(state, cfg, ctx, fingerprint, Path(run_dir))
        else:
            log(f"{run_dir} has no checkpoint yet: starting it from epoch 1, which is where it was")
    model = build_model(cfg.model)
    if cfg.model.pretrained and state is None:
        load_pretrained(model, cfg.model.pretrained, log)
    n_params = count_parameters(model)
    if ctx.is_main:
        if run_dir is None:
            run_dir = make_run_dir(cfg.train.output, cfg)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if state is None:
            write_json(Path(run_dir) / "config.json", cfg.to_dict())
    run_dir = Path(broadcast_value(str(run_dir), ctx))
    signals.run_dir = run_dir
    log(f"{cfg.model.name}: {n_params:,} parameters | device {device}"
        f"{f' x {ctx.world_size} processes' if ctx.enabled else ''} | protocol {cfg.data.protocol} "
        f"{splits.sizes()} | run {run_dir}")

    model.to(device)
    images, labels = data.images.to(device), data.labels.to(device)
    train_idx, val_idx, test_idx = (s.to(device) for s in (splits.train, splits.val, splits.test))
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    steps_per_epoch = max(len(train_idx) // cfg.train.batch_size, 1)
    total_steps = steps_per_epoch * cfg.train.epochs
    optimizer = build_optimizer(model, cfg, device)
    schedule = WarmupCosine(total_steps, int(cfg.optim.warmup_epochs * steps_per_epoch), cfg.optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    train_labels = labels[train_idx]
    loss_weights = None
    if cfg.optim.class_weights == "balanced":
        loss_weights = class_weights(train_labels, cfg.model.num_classes)
    elif cfg.optim.class_weights != "none":
        raise FervitError(f"optim.class_weights must be none or balanced, got '{cfg.optim.class_weights}'")
    sample_weights = None
    if cfg.optim.sampler == "balanced":
        sample_weights = class_weights(train_labels, cfg.model.num_classes)[train_labels]
    elif cfg.optim.sampler != "uniform":
        raise FervitError(f"optim.sampler must be uniform or balanced, got '{cfg.optim.sampler}'")
    ema = None
    if cfg.optim.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema_decay), use_buffers=True)
    if state is not None:
        restore(state, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, run_dir=run_dir, ctx=ctx)
    side = cfg.model.crop_size or cfg.model.img_size  # what training feeds the model
    example = torch.zeros(cfg.train.batch_size // ctx.world_size, cfg.model.in_chans, side, side, device=device)
    train_model = maybe_compile(wrap_model(model, ctx), cfg.train.compile, device, example)
    eval_model = ema.module if ema is not None else model

    rows: list[dict] = []
    best_acc, best_epoch, stale, epoch, stop_reason = -1.0, 0, 0, 0, ""
    epochs = cfg.train.epochs
    if state is not None:
        p = state.progress
        rows, best_acc, best_epoch, stale, epoch = p["rows"], p["best_acc"], p["best_epoch"], p["stale"], p["epoch"]
        epochs, stop_reason, t_start = p["epochs"], p["stop_reason"], time.time() - p["elapsed_s"]
        restore_rng(state, gen, ctx)  # last: building and compiling above may draw random numbers
        if ctx.is_main:  # forget an epoch a killed process logged after its last checkpoint
            write_metrics_csv(run_dir / "training_metrics.csv", rows)
        log(f"resuming after epoch {epoch}/{epochs}")
    tb = TensorBoardLog(run_dir, CLASSES, start_epoch=epoch, enabled=ctx.is_main)
    checkpoints = CheckpointWriter()
    interrupted = False
    try:
        while epoch < epochs and not stop_reason:
            epoch += 1
            t0 = time.time()
            with tqdm(total=len(train_idx), desc=f"epoch {epoch}/{epochs}", unit="img", leave=False,
                      disable=quiet or not ctx.is_main, dynamic_ncols=True) as bar:
                lr = optimizer.param_groups[0]["lr"]
                tr = train_one_epoch(train_model, ema, images, labels, train_idx, optimizer, scheduler, cfg, gen,
                                     amp_dtype, loss_weights, sample_weights, bar, ctx if ctx.enabled else None)
            val = evaluate_split(eval_model, images, labels, val_idx, cfg, amp_dtype, ctx)
            row = {"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                   "val_loss": val["loss"], "val_acc": val["acc"], "seconds": time.time() - t0}
            rows.append(row)
            improved = val["acc"] > best_acc
            if improved:
                best_acc, best_epoch, stale = val["acc"], epoch, 0
                if ctx.is_main:
                    save_model(eval_model, cfg.model, run_dir / WEIGHTS_NAME,
                               extra={"epoch": epoch, "val_acc": val["acc"], "protocol": cfg.data.protocol,
                                      "split": split_settings(cfg)})
            else:
                stale += 1
            if ctx.is_main:
                write_metrics_csv(run_dir / "training_metrics.csv", rows)
                tb.epoch(row, val["confusion"])
            log(f"epoch {epoch:3d}/{epochs} lr {lr:.2e} | train loss {tr['loss']:.4f} acc {tr['acc']:.4f}"
                f" | val loss {val['loss']:.4f} acc {val['acc']:.4f}{' *' if improved else ''}"
                f" | {row['seconds']:.1f}s")
            if cfg.train.time_budget_s > 0 and epoch == 2:
                # epoch 1 carries compilation; epoch 2 is the steady-state cost; rank 0's clock decides for all
                fit = int((cfg.train.time_budget_s - (time.time() - t_start)) / max(row["seconds"], 1e-3)) + 2
                fit = broadcast_value(fit, ctx)
                if fit < epochs:
                    epochs = max(fit, 2)
                    schedule.total_steps = steps_per_epoch * epochs
                    log(f"time budget {cfg.train.time_budget_s:.0f}s: training {epochs} epochs")
            if cfg.train.early_stop_patience and stale >= cfg.train.early_stop_patience:
                stop_reason = f"early stop: no better validation accuracy for {stale} epochs"
            if on_epoch is not None:
                stop_reason = broadcast_value((on_epoch(row) if ctx.is_main else None) or stop_reason, ctx)
            preempted = any_rank(bool(signals.requested), ctx)
            progress = {"epoch": epoch, "epochs": epochs, "rows": rows, "best_acc": best_acc,
                        "best_epoch": best_epoch, "stale": stale, "stop_reason": stop_reason,
                        "elapsed_s": time.time() - t_start}
            checkpoints.save(run_dir, ctx, cfg, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                             gen=gen, progress=progress, fingerprint=fingerprint)
            if preempted:
                checkpoints.wait()
                tb.close()
                raise Preempted(f"{signals.requested or 'a stop signal to another rank'}: stopped after epoch "
                                f"{epoch} with a checkpoint; continue with `fervit train --resume {run_dir}`",
                                run_dir, epoch)
            if stop_reason:
                log(stop_reason)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: finishing the run folder with the best checkpoint so far")
    checkpoints.wait()
    tb.close()
    if not rows:
        raise FervitError(f"training stopped before the first epoch finished; nothing to evaluate in {run_dir}")
    if ctx.is_main:
        extra = {"best_epoch": best_epoch, "interrupted": interrupted, "epochs_planned": epochs,
                 "wall_seconds": time.time() - t_start}
        if stop_reason:
            extra["stopped"] = stop_reason
        if ctx.enabled:
            extra["world_size"] = ctx.world_size
        finish_run(run_dir, cfg, data, splits, rows, device, amp_dtype, n_params, extra, quiet=quiet)
        remove_last(run_dir)
    barrier(ctx)
    return run_dir


def evaluate_split(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                   cfg: RunConfig, amp_dtype, ctx: DistContext) -> dict:
    """Loss, accuracy and confusion matrix of one split; under DDP each rank scores its slice and the
    sums are reduced, so every rank sees the whole split's numbers."""
    part = indices.tensor_split(ctx.world_size)[ctx.rank] if ctx.enabled else indices
    r = evaluate(model, images, labels, part, cfg.train.eval_batch_size, amp_dtype)
    cm = confusion_matrix(r["preds"], r["labels"], cfg.model.num_classes)
    if not ctx.enabled:
        return {"loss": r["loss"], "acc": r["acc"], "confusion": cm}
    sums = torch.tensor([r["loss"] * len(part), float(len(part))], dtype=torch.float64, device=ctx.device)
    sums = all_reduce_sum(sums, ctx)
    cm = all_reduce_sum(cm.to(ctx.device), ctx).cpu()
    n = max(float(sums[1]), 1.0)
    return {"loss": float(sums[0]) / n, "acc": float(cm.diag().sum()) / n, "confusion": cm}


def finish_run(run_dir: Path, cfg: RunConfig, data: FerData, splits: Splits, rows: list[dict],
               device: torch.device, amp_dtype, n_params: int, extra: dict, quiet: bool = False) -> dict:
    """Reload the best checkpoint, evaluate val and test, write curves, confusion matrix and results.json."""
    curves_png(rows, "loss", run_dir / "loss_curve.png", "cross-entropy loss")
    curves_png(rows, "acc", run_dir / "accuracy_curve.png", "accuracy")
    model, _ = load_model(run_dir, device)
    images, labels = data.images.to(device), data.labels.to(device)
    val = evaluate(model, images, labels, splits.val.to(device), cfg.train.eval_batch_size, amp_dtype, cfg.train.tta)
    test = evaluate(model, images, labels, splits.test.to(device), cfg.train.eval_batch_size, amp_dtype,
                    cfg.train.tta)
    results = {
        "model": model_label(cfg.model.name, cfg.model.backbone),
        "params": n_params,
        "protocol": cfg.data.protocol,
        "data_root": str(cfg.data.root),
        "split_sizes": splits.sizes(),
        "classes": list(CLASSES),
        "epochs_completed": len(rows),
        "epochs_planned": extra.pop("epochs_planned", len(rows)),
        "best_val_acc": max(r["val_acc"] for r in rows),
        "tta": cfg.train.tta,
        "device": str(device),
        "torch": torch.__version__,
        **extra,
        "val": split_report(val, "validation"),
        "test": split_report(test, "test", run_dir, "confusion_matrix.png"),
    }
    write_json(run_dir / "results.json", results)
    if not quiet:
        print(f"best epoch {extra.get('best_epoch')} | val acc {results['val']['accuracy']:.4f} | "
              f"test acc {results['test']['accuracy']:.4f} | macro F1 {results['test']['macro_avg']['f1']:.4f} | "
              f"{run_dir}")
    return results
