"""TensorBoard event files in the run folder: per-epoch loss, accuracy, learning rate and per-class recall.

TensorBoard is an optional extra (`pip install fervit[tensorboard]`); without it this logs nothing and
warns once per process.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

_warned = False


class TensorBoardLog:
    """Scalars for one run, written to `run_dir/tensorboard/`. `start_epoch` > 0 (a resumed run) drops
    events a killed process wrote after its last checkpoint, so the curves have no duplicate points."""

    def __init__(self, run_dir: Path, class_names, start_epoch: int = 0, enabled: bool = True):
        global _warned
        self.class_names = list(class_names)
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            if not _warned:
                warnings.warn("tensorboard is not installed, so runs get no event files; "
                              "pip install 'fervit[tensorboard]'", stacklevel=2)
                _warned = True
            return
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_epoch + 1)

    def epoch(self, row: dict, val_confusion: torch.Tensor) -> None:
        """One point per curve at step = epoch."""
        if self.writer is None:
            return
        step = row["epoch"]
        w = self.writer
        w.add_scalar("loss/train", row["train_loss"], step)
        w.add_scalar("loss/val", row["val_loss"], step)
        w.add_scalar("accuracy/train", row["train_acc"], step)
        w.add_scalar("accuracy/val", row["val_acc"], step)
        w.add_scalar("lr", row["lr"], step)
        cm = val_confusion.double()
        recall = cm.diag() / cm.sum(1).clamp(min=1)
        for name, value in zip(self.class_names, recall.tolist()):
            w.add_scalar(f"val_recall/{name}", value, step)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
