"""Evaluation split over the processes of a DDP run: each rank scores its slice, the sums are reduced."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from fervit.evaluation.evaluate import evaluate
from fervit.evaluation.metrics import confusion_matrix


def evaluate_sharded(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                     batch_size: int, amp_dtype, num_classes: int, rank: int = 0, world_size: int = 1) -> dict:
    """Loss, accuracy and confusion matrix of one split. With `world_size` processes (an initialised process
    group) rank `rank` scores its slice and every rank gets the whole split's numbers."""
    part = indices.tensor_split(world_size)[rank] if world_size > 1 else indices
    r = evaluate(model, images, labels, part, batch_size, amp_dtype)
    cm = confusion_matrix(r["preds"], r["labels"], num_classes)
    if world_size == 1:
        return {"loss": r["loss"], "acc": r["acc"], "confusion": cm}
    device = images.device
    sums = torch.tensor([r["loss"] * len(part), float(len(part))], dtype=torch.float64, device=device)
    cm = cm.to(device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(cm, op=dist.ReduceOp.SUM)
    cm = cm.cpu()
    n = max(float(sums[1]), 1.0)
    return {"loss": float(sums[0]) / n, "acc": float(cm.diag().sum()) / n, "confusion": cm}
