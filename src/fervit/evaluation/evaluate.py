"""Evaluate a model on a split of device-resident uint8 images, and write results + figures."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fervit.data.images import MEAN, STD, normalize
from fervit.data.dataset import CLASSES
from fervit.data.tta import mean_log_probs, tta_mode, tta_views
from fervit.device import autocast
from fervit.evaluation.metrics import classification_report, confusion_matrix
from fervit.evaluation.plots import confusion_matrix_png
from fervit.progress import progress_bar


def model_crop_size(model: nn.Module) -> int:
    """The crop a fervit model works on (`model.crop_size`), or 0 for a model that takes the whole face."""
    model = getattr(model, "module", model)  # an EMA or DDP wrapper
    model = getattr(model, "_orig_mod", model)  # torch.compile
    size = getattr(model, "input_size", 0)
    return size if isinstance(size, int) else 0


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, indices: torch.Tensor, batch_size: int = 1024,
                   amp_dtype: torch.dtype | None = None, tta: bool | str = False,
                   input_spec: tuple[float, float] = (MEAN, STD), progress: bool = False) -> torch.Tensor:
    """Logits (N, C) float32 for images[indices], no augmentation; with `tta` (mirror or ten_crop, see
    `tta_views`) the average of the views' log-probabilities. `input_spec`: the (mean, std) the model's
    file records (fervit trains with MEAN and STD). `progress`: a bar (`fervit evaluate` on a CPU takes minutes)."""
    model.eval()
    device = images.device
    mode = tta_mode(tta)
    crop = model_crop_size(model)
    out = []
    for start in progress_bar(range(0, len(indices), batch_size), desc="evaluating", quiet=not progress,
                              unit="batch"):
        x = normalize(images[indices[start:start + batch_size]], *input_spec)
        with autocast(device, amp_dtype):
            if mode == "none":
                logits = model(x).float()
            else:
                logits = mean_log_probs(model(tta_views(x, mode, crop)).float(), len(x))
        out.append(logits)
    return torch.cat(out) if out else torch.zeros(0, len(CLASSES), device=device)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             batch_size: int = 1024, amp_dtype: torch.dtype | None = None, tta: bool | str = False,
             input_spec: tuple[float, float] = (MEAN, STD), progress: bool = False) -> dict:
    """Loss, accuracy and predictions on one split; stays on the device until the final read."""
    logits = predict_logits(model, images, indices, batch_size, amp_dtype, tta, input_spec, progress)
    y = labels[indices]
    loss = F.cross_entropy(logits, y) if len(y) else torch.tensor(0.0)
    preds = logits.argmax(-1)
    acc = (preds == y).float().mean() if len(y) else torch.tensor(0.0)
    return {"loss": float(loss), "acc": float(acc), "preds": preds.cpu(), "labels": y.cpu(),
            "logits": logits.cpu()}


def split_report(result: dict, split: str, run_dir: Path | None = None, figure_name: str = "") -> dict:
    """The results.json section for one split; draws its confusion matrix when asked."""
    cm = confusion_matrix(result["preds"], result["labels"], len(CLASSES))
    report = classification_report(cm, CLASSES)
    report["loss"] = result["loss"]
    if run_dir is not None and figure_name:
        confusion_matrix_png(cm, CLASSES, run_dir / figure_name,
                             title=f"{split} confusion matrix (row-normalised), accuracy {report['accuracy']:.1%}")
    return report
