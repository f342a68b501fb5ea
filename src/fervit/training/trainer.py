"""Training: the dataset lives on the device as uint8; batches are indexed and augmented there.

`train_one_epoch` and `evaluate` are the two halves; `train` wires data, model, optimiser and the
run folder together and always finishes the run folder, also after Ctrl-C.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fervit.config import RunConfig, resolve_data_root
from fervit.data.augment import augment_batch, mix_batch
from fervit.data.dataset import CLASSES, FerData, load_fer
from fervit.data.splits import Splits, make_splits
from fervit.errors import FervitError
from fervit.evaluation.evaluate import autocast, evaluate, split_report
from fervit.evaluation.plots import curves_png
from fervit.io import write_json
from fervit.models import build_model, count_parameters
from fervit.runs import make_run_dir, write_metrics_csv
from fervit.training.checkpoint import WEIGHTS_NAME, load_model, save_model, unwrap


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


def train_one_epoch(model, ema, images, labels, train_idx, optimizer, scheduler, cfg: RunConfig, gen,
                    amp_dtype, loss_weights, sample_weights=None, bar=None) -> dict:
    """One pass over a fresh permutation (or balanced draw) of train_idx; metrics stay on device."""
    model.train()
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
        x = augment_batch(images[idx], cfg.augment, gen)  # (B, 1, 48, 48) float32
        target = y
        if mixing:
            x, target = mix_batch(x, y, cfg.augment, cfg.model.num_classes, gen)
        with autocast(device, amp_dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target, weight=loss_weights,
                               label_smoothing=cfg.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(-1) == y).sum()
        if bar is not None:
            bar.update(len(idx))
            if device.type == "cpu" and step % 10 == 0:  # a cheap read on CPU; on GPU only per epoch
                seen = start + len(idx)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{float(correct) / seen:.3f}")
    return {"loss": float(loss_sum) / n_used, "acc": float(correct) / n_used}


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


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load matching weights from a local .safetensors file (a fervit checkpoint or a bare state dict)."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise FervitError(f"model.pretrained '{p}' does not exist; give a local .safetensors file")
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
    print(f"loaded {len(usable)}/{len(own)} tensors from {p}")


def train(cfg: RunConfig, quiet: bool = False, data: FerData | None = None) -> Path:
    """Train one model as configured; returns the finished run folder."""
    t_start = time.time()
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    if data is None:
        root = resolve_data_root(cfg.data.root)
        cfg.data.root = root
        data = load_fer(root, cfg.data.cache_dir or None, cfg.data.strict, progress=not quiet)
    splits = make_splits(data, cfg.data.protocol, cfg.data.val_fraction, cfg.data.split_seed,
                         cfg.data.drop_eval_duplicates)
    for name, size in splits.sizes().items():
        if size == 0:
            raise FervitError(f"the {cfg.data.protocol} protocol leaves the {name} split empty for this data")
    model = build_model(cfg.model)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
    n_params = count_parameters(model)
    run_dir = make_run_dir(cfg.train.output, cfg)
    write_json(run_dir / "config.json", cfg.to_dict())
    log = (lambda *a: None) if quiet else print
    log(f"{cfg.model.name}: {n_params:,} parameters | device {device} | protocol {cfg.data.protocol} "
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
    example = torch.zeros(cfg.train.batch_size, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size,
                          device=device)
    train_model = maybe_compile(model, cfg.train.compile, device, example)
    eval_model = ema.module if ema is not None else model

    rows: list[dict] = []
    best_acc, best_epoch, stale = -1.0, 0, 0
    interrupted = False
    epochs = cfg.train.epochs
    try:
        epoch = 0
        while epoch < epochs:
            epoch += 1
            t0 = time.time()
            with tqdm(total=len(train_idx), desc=f"epoch {epoch}/{epochs}", unit="img", leave=False,
                      disable=quiet, dynamic_ncols=True) as bar:
                lr = optimizer.param_groups[0]["lr"]
                tr = train_one_epoch(train_model, ema, images, labels, train_idx, optimizer, scheduler, cfg, gen,
                                     amp_dtype, loss_weights, sample_weights, bar)
            val = evaluate(eval_model, images, labels, val_idx, cfg.train.eval_batch_size, amp_dtype)
            row = {"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                   "val_loss": val["loss"], "val_acc": val["acc"], "seconds": time.time() - t0}
            rows.append(row)
            write_metrics_csv(run_dir / "training_metrics.csv", rows)
            improved = val["acc"] > best_acc
            if improved:
                best_acc, best_epoch, stale = val["acc"], epoch, 0
                save_model(eval_model, cfg.model, run_dir / WEIGHTS_NAME,
                           extra={"epoch": epoch, "val_acc": val["acc"], "protocol": cfg.data.protocol})
            else:
                stale += 1
            log(f"epoch {epoch:3d}/{epochs} lr {lr:.2e} | train loss {tr['loss']:.4f} acc {tr['acc']:.4f}"
                f" | val loss {val['loss']:.4f} acc {val['acc']:.4f}{' *' if improved else ''}"
                f" | {row['seconds']:.1f}s")
            if cfg.train.time_budget_s > 0 and epoch == 2:
                # epoch 1 carries compilation; epoch 2 is the steady-state cost
                fit = int((cfg.train.time_budget_s - (time.time() - t_start)) / max(row["seconds"], 1e-3)) + 2
                if fit < epochs:
                    epochs = max(fit, 2)
                    schedule.total_steps = steps_per_epoch * epochs
                    log(f"time budget {cfg.train.time_budget_s:.0f}s: training {epochs} epochs")
            if cfg.train.early_stop_patience and stale >= cfg.train.early_stop_patience:
                log(f"early stop: no better validation accuracy for {stale} epochs")
                break
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: finishing the run folder with the best checkpoint so far")
    if not rows:
        raise FervitError(f"training stopped before the first epoch finished; nothing to evaluate in {run_dir}")
    finish_run(run_dir, cfg, data, splits, rows, device, amp_dtype, n_params,
               {"best_epoch": best_epoch, "interrupted": interrupted, "epochs_planned": epochs,
                "wall_seconds": time.time() - t_start},
               quiet=quiet)
    return run_dir


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
        "model": cfg.model.name,
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
