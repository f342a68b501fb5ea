"""TensorBoard event files in the run folder, and a silent no-op (one warning) without the extra."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import fervit.training.tensorboard as tensorboard
from fervit.data.dataset import CLASSES
from fervit.training.tensorboard import TensorBoardLog

ROW = {"epoch": 1, "lr": 1e-3, "train_loss": 1.9, "train_acc": 0.2, "val_loss": 1.8, "val_acc": 0.25}


def test_event_files_hold_loss_accuracy_lr_and_per_class_recall(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = TensorBoardLog(tmp_path, CLASSES)
    log.epoch(ROW, torch.eye(7, dtype=torch.long) * 3)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"} <= tags
    assert {f"val_recall/{name}" for name in CLASSES} <= tags
    assert events.Scalars("val_recall/happy")[0].value == pytest.approx(1.0)


def test_without_tensorboard_nothing_is_written_and_one_warning_is_given(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    monkeypatch.setattr(tensorboard, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            log = TensorBoardLog(tmp_path, CLASSES)
            log.epoch(ROW, torch.zeros(7, 7, dtype=torch.long))
            log.close()
    assert len(caught) == 1 and "fervit[tensorboard]" in str(caught[0].message)
    assert not (tmp_path / "tensorboard").exists()
