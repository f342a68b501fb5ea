"""Preemption-safe exact resume: stop a run (signal, kill during a checkpoint write), continue it, and it ends
exactly where the uninterrupted run ends. Bad resume requests end in one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_layout
from helpers import tiny_run_config

import fervit.training.step as epoch_module  # the step draws the augmentation
import fervit.training.resume as resume
from fervit.cli import main
from fervit.training.resume import EXIT_REQUEUE, LAST_DIR, MANIFEST, Preempted, load_last
from fervit.training.trainer import train

EPOCHS = 4


def config(root: Path, out: Path, *extra: str):
    """A tiny run that exercises every RNG consumer: augmentation, dropout, mixup's Beta draw, EMA."""
    return tiny_run_config(f"train.epochs={EPOCHS}", "train.batch_size=16", "model.dropout=0.1",
                           "augment.mixup_alpha=0.2", "optim.ema_decay=0.9", *extra, root=root, output=out)


def outcome(run_dir: Path) -> dict:
    """What must match between runs: every metric row (without wall time) and the final evaluation."""
    res = json.loads((run_dir / "results.json").read_text())
    rows = (run_dir / "training_metrics.csv").read_text().splitlines()
    return {"rows": [r.rsplit(",", 1)[0] for r in rows], "val": res["val"], "test": res["test"],
            "best_epoch": res["best_epoch"], "epochs": res["epochs_completed"]}


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("resume") / "fer", per_class=6)


@pytest.fixture(scope="module")
def reference(layout) -> dict:
    """The uninterrupted run every interrupted one is compared with."""
    return outcome(train(config(layout, layout.parent / "reference"), quiet=True))


def signal_during_epoch(monkeypatch, epoch: int, signum=signal.SIGUSR1, times: int = 1) -> None:
    """Send `signum` to this process `times` times in the middle of `epoch` (between its augmentation calls)."""
    calls = {"n": 0}
    augment = epoch_module.augment_batch
    steps_per_epoch = 35 // 16  # 6 faces x 7 classes, one per class held out for validation, batches of 16

    def augment_and_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == (epoch - 1) * steps_per_epoch + 2:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return augment(*args, **kwargs)

    monkeypatch.setattr(epoch_module, "augment_batch", augment_and_signal)


def test_signal_mid_epoch_finishes_the_epoch_checkpoints_and_resumes_exactly(layout, reference, monkeypatch,
                                                                            tmp_path):
    signal_during_epoch(monkeypatch, epoch=2)
    with pytest.raises(Preempted) as stop:
        train(config(layout, tmp_path), quiet=True)
    run_dir = stop.value.run_dir
    assert stop.value.epoch == 2 and load_last(run_dir).epoch == 2
    assert not (run_dir / "results.json").exists()
    monkeypatch.undo()
    train(config(layout, tmp_path), quiet=True, run_dir=run_dir, resume=True)
    assert outcome(run_dir) == reference
    assert not (run_dir / LAST_DIR).exists()  # a finished run drops its resume state


def test_second_signal_abandons_the_epoch_and_the_previous_checkpoint_resumes_exactly(layout, reference,
                                                                                     monkeypatch, tmp_path):
    signal_during_epoch(monkeypatch, epoch=3, signum=signal.SIGTERM, times=2)
    with pytest.raises(Preempted):
        train(config(layout, tmp_path), quiet=True)
    (run_dir,) = tmp_path.iterdir()
    assert load_last(run_dir).epoch == 2
    monkeypatch.undo()
    train(config(layout, tmp_path), quiet=True, run_dir=run_dir, resume=True)
    assert outcome(run_dir) == reference


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no handler catches it."""


def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_valid(layout, reference, monkeypatch,
                                                                            tmp_path):
    write_json = resume.write_json

    def killed_at_epoch_3_manifest(path, obj):
        if Path(path).name == MANIFEST and obj["epoch"] == 3:
            raise Killed
        write_json(path, obj)

    monkeypatch.setattr(resume, "write_json", killed_at_epoch_3_manifest)
    with pytest.raises(Killed):
        train(config(layout, tmp_path), quiet=True)
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / LAST_DIR / "e0003.safetensors").is_file()  # written, but never committed by a manifest
    assert load_last(run_dir).epoch == 2
    monkeypatch.undo()
    train(config(layout, tmp_path), quiet=True, run_dir=run_dir, resume=True)
    assert outcome(run_dir) == reference


def test_sigterm_to_the_cli_exits_for_requeue_and_resume_finishes_the_run(layout, tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "fervit", "train", "--preset", "tiny", "--data", str(layout), "--cache-dir",
           str(layout.parent / "cache"), "--output", str(out), "--device", "cpu", "--epochs", "12", "--quiet",
           "--set", "train.threads=1", "--set", "train.batch_size=16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("*/training_metrics.csv")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # a finished epoch proves the stop handlers are installed (train installs them before epoch 1)
    assert proc.poll() is None and list(out.glob("*/training_metrics.csv")), "no epoch finished to signal after"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_REQUEUE, err
    (run_dir,) = out.iterdir()
    assert "fervit train --resume" in err and load_last(run_dir).epoch < 12
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert json.loads((run_dir / "results.json").read_text())["epochs_completed"] == 12


@pytest.fixture
def stopped_run(layout, monkeypatch, tmp_path) -> Path:
    signal_during_epoch(monkeypatch, epoch=1)
    with pytest.raises(Preempted) as stop:
        train(config(layout, tmp_path), quiet=True)
    monkeypatch.undo()
    return stop.value.run_dir


def test_the_same_run_dir_command_line_resumes_a_stopped_run_exactly(stopped_run, layout, reference):
    settings = ["train.threads=1", "train.batch_size=16", "model.dropout=0.1", "augment.mixup_alpha=0.2",
                "optim.ema_decay=0.9"]
    argv = ["train", "--run-dir", str(stopped_run), "--preset", "tiny", "--data", str(layout), "--cache-dir",
            str(layout.parent / "cache"), "--output", str(stopped_run.parent), "--device", "cpu",
            "--epochs", str(EPOCHS), "--quiet"]
    assert main(argv + [arg for s in settings for arg in ("--set", s)]) == 0
    assert outcome(stopped_run) == reference


def test_resuming_a_damaged_checkpoint_is_one_clear_error(stopped_run, capsys):
    tensors = stopped_run / LAST_DIR / "e0001.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    assert main(["train", "--resume", str(stopped_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "damaged" in err and "checksum" in err


def test_resuming_with_another_recipe_is_refused(stopped_run, capsys):
    assert main(["train", "--resume", str(stopped_run), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "'optim.lr' is 0.5" in err and "keeps its recipe" in err


def test_resuming_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_resuming_with_another_number_of_processes_is_refused(stopped_run, layout):
    from fervit.data.dataset import load_fer
    from fervit.errors import FervitError
    from fervit.training.distributed import DistContext

    cfg = config(layout, stopped_run.parent)
    data = load_fer(layout, layout.parent / "cache", progress=False)
    with pytest.raises(FervitError, match="trained by 1 process"):  # refused before any collective call
        train(cfg, quiet=True, data=data, run_dir=stopped_run, resume=True, ctx=DistContext(world_size=2))


# the issue-11 recipe: SGD with Nesterov momentum, plateau drops (patience 1, so they happen in 4 epochs), EMA warm-up
RECIPE = ("optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=1e-4", "optim.schedule=plateau",
          "optim.plateau_patience=1", "optim.warmup_epochs=1", "optim.ema_warmup=true")


def test_sgd_plateau_and_ema_warmup_resume_exactly(layout, monkeypatch, tmp_path):
    uninterrupted = outcome(train(config(layout, tmp_path / "reference", *RECIPE), quiet=True))
    signal_during_epoch(monkeypatch, epoch=3)
    with pytest.raises(Preempted) as stop:
        train(config(layout, tmp_path / "stopped", *RECIPE), quiet=True)
    monkeypatch.undo()
    train(config(layout, tmp_path / "stopped", *RECIPE), quiet=True, run_dir=stop.value.run_dir, resume=True)
    assert outcome(stop.value.run_dir) == uninterrupted


def test_a_checkpoint_written_before_the_sgd_plateau_and_ema_warmup_keys_still_resumes(tmp_path):
    from fervit.config import RunConfig, apply_overrides
    from fervit.errors import FervitError
    from fervit.training.resume import check_config

    saved = RunConfig().to_dict()
    for key in ("name", "momentum", "nesterov", "schedule", "plateau_factor", "plateau_patience", "ema_warmup"):
        del saved["optim"][key]
    check_config(saved, RunConfig(), tmp_path)  # the missing keys mean what they meant then: the defaults
    with pytest.raises(FervitError, match="'optim.name' is 'sgd'"):
        check_config(saved, apply_overrides(RunConfig(), ["optim.name=sgd"]), tmp_path)
