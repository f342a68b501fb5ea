"""A run can be watched: figures after every epoch, one line per epoch into a log (no progress-bar spam), the
epoch's peak learning rate, and a warning as it starts when the plan will take hours."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import make_layout
from helpers import tiny_run_config

from fervit.data.dataset import CLASSES, load_fer
from fervit.training.trainer import train
from fervit.training.watch import Figures, PlanCheck


class Clock:
    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def run_steps(plan: PlanCheck, n: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            plan.step()
        plan.epoch_end()
    return [str(w.message) for w in caught]


def test_a_plan_of_hours_on_a_cpu_is_said_early_with_the_cpu_presets():
    plan = PlanCheck(epochs=60, steps_per_epoch=200, device="cpu", clock=Clock(2.0))  # 2 s a step
    said = run_steps(plan, 20)
    assert len(said) == 1 and plan.steps <= 10  # judged after ~15 s of steps, not at the end of the epoch
    assert "about 6.7 h on cpu: 60 epochs x 6.7 min" in said[0] and "--preset cpu_fast" in said[0]


def test_a_short_plan_or_one_capped_by_a_time_budget_says_nothing():
    assert run_steps(PlanCheck(10, 200, "cpu", clock=Clock(0.5)), 200) == []  # 17 min
    assert run_steps(PlanCheck(60, 200, "cpu", budget_s=1800, clock=Clock(2.0)), 20) == []
    # a budget of hours was asked for: no warning, and no advice to pick the CPU preset it may already be
    assert run_steps(PlanCheck(200, 200, "cpu", budget_s=6900, clock=Clock(2.0)), 20) == []


def test_a_short_epoch_is_judged_at_its_end():
    said = run_steps(PlanCheck(epochs=5000, steps_per_epoch=5, device="cuda", clock=Clock(0.5)), 5)
    assert len(said) == 1 and "on cuda" in said[0] and "cpu_fast" not in said[0]


@pytest.mark.slow
def test_figures_are_drawn_each_epoch_unless_they_would_cost_more_than_a_twentieth(tmp_path):
    rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_acc": 0.3, "val_acc": 0.25}]
    times = iter([0.0, 1.0, 5.0, 30.0, 31.0])  # drawing takes 1 s
    figures = Figures(tmp_path, CLASSES, clock=lambda: next(times))
    assert figures.epoch(rows, torch.eye(7))  # drawn at once
    assert {p.name for p in tmp_path.iterdir()} == {"loss_curve.png", "accuracy_curve.png", "confusion_matrix_val.png"}
    assert not figures.epoch(rows, torch.eye(7))  # 4 s later: 1 s would be 25% of the time
    assert figures.epoch(rows, torch.eye(7))  # 29 s later: 3%


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_fer(make_layout(tmp_path_factory.mktemp("watch") / "fer", per_class=6), progress=False)


@pytest.mark.slow
def test_the_figures_exist_after_the_first_epoch(data, tmp_path):
    seen = []

    def after_epoch(row):
        run = next(tmp_path.iterdir())
        seen.append(sorted(p.name for p in run.glob("*.png")))

    train(tiny_run_config("train.epochs=2", "train.batch_size=16", output=tmp_path), quiet=True, data=data,
          on_epoch=after_epoch)
    assert seen[0] == ["accuracy_curve.png", "confusion_matrix_val.png", "loss_curve.png"]


@pytest.mark.slow
@pytest.mark.e2e
def test_into_a_log_file_training_writes_one_line_per_epoch_with_its_peak_lr(tmp_path):
    root = make_layout(tmp_path / "fer", per_class=6)
    done = subprocess.run([sys.executable, "-m", "fervit", "train", "--preset", "tiny", "--data", str(root),
                           "--device", "cpu", "--epochs", "2", "--batch-size", "16", "--lr", "0.01",
                           "--output", str(tmp_path / "runs"), "--set", "optim.warmup_epochs=2",
                           "--set", "train.threads=1"],
                          capture_output=True, text=True, timeout=300)  # pipes: not a terminal
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr + done.stdout and "img/s" not in done.stderr  # no tqdm updates
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2
    # 7 classes x 6 images, 10% validation: 37 training images, 2 steps of 16 per epoch, a 4-step warm-up to 0.01:
    # epoch 1 runs at 0.0025 and 0.005, epoch 2 at 0.0075 and 0.01
    peaks = [float(re.search(r"peak lr (\S+)", line).group(1)) for line in epochs]
    assert peaks == pytest.approx([0.005, 0.01])
