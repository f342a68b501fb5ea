"""Watching a run while it trains: the epoch's progress bar (on a terminal only, fervit.progress), the figures
redrawn after every epoch, and a warning, as the first epoch starts, when a plan with no time budget will take hours
on this device.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from fervit.progress import progress_bar

PLAN_WARN_S = 3600.0  # a plan longer than this is said before it has run long
MEASURE_S = 15.0  # the estimate waits for this much training time (after the first step) ...
MEASURE_STEPS = 3  # ... and this many steps, so that one slow step does not decide it
FIGURE_SHARE = 0.05  # the per-epoch figures may cost at most this share of the wall time


class PlanCheck:
    """Times the first steps of a run's first epoch and warns once when epochs x that pace exceeds PLAN_WARN_S.

    The first step is left out of the pace: it carries one-time work (allocations, a compiled graph). `clock` is
    injectable so that tests need no real time.
    """

    def __init__(self, epochs: int, steps_per_epoch: int, device: str, budget_s: float = 0.0,
                 clock=time.monotonic):
        self.epochs, self.steps_per_epoch, self.device, self.budget_s = epochs, steps_per_epoch, device, budget_s
        self.clock = clock
        self.steps, self.t0, self.done = 0, None, False
        self.message: str | None = None

    def step(self) -> None:
        if self.done:
            return
        self.steps += 1
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
            return
        measured = self.steps - 1
        if now - self.t0 >= MEASURE_S and measured >= MEASURE_STEPS:
            self.judge((now - self.t0) / measured * self.steps_per_epoch, measured)

    def epoch_end(self) -> None:
        """An epoch shorter than MEASURE_S: judge on the whole of it."""
        if not self.done and self.t0 is not None and self.steps > 1:
            self.judge((self.clock() - self.t0) / (self.steps - 1) * self.steps_per_epoch, self.steps - 1)

    def judge(self, epoch_s: float, measured: int) -> None:
        self.done = True
        total = epoch_s * self.epochs
        # a train.time_budget_s is the user's own word on how long the run may take: nothing to warn about
        if self.budget_s > 0 or total <= PLAN_WARN_S:
            return
        fix = ("--preset cpu_fast trains a CPU model in under 20 minutes, or fewer --epochs" if self.device == "cpu"
               else "fewer --epochs")
        self.message = (f"this plan will take about {total / 3600:.1f} h on {self.device}: {self.epochs} epochs x "
                        f"{epoch_s / 60:.1f} min of training each (measured on {measured} steps); {fix}, or "
                        "--set train.time_budget_s=SECONDS to cap it (Ctrl-C keeps the best model so far)")
        with tqdm.external_write_mode():  # not into the middle of the bar's line
            warnings.warn(self.message, stacklevel=2)


class EpochBar:
    """What `train_one_epoch` reports to: a `progress_bar`, plus the plan check on the run's first epoch."""

    def __init__(self, total: int, desc: str, quiet: bool, plan: PlanCheck | None = None):
        self.bar = progress_bar(total=total, desc=desc, quiet=quiet)
        self.plan = plan

    def update(self, n: int) -> None:
        self.bar.update(n)
        if self.plan is not None:
            self.plan.step()

    def set_postfix(self, **kwargs) -> None:
        self.bar.set_postfix(**kwargs)

    def __enter__(self) -> EpochBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.plan is not None and exc[0] is None:
            self.plan.epoch_end()


class Figures:
    """Redraws a run's loss and accuracy curves and its validation confusion matrix after an epoch, so a run can be
    watched as it goes (they were drawn only at the end). Drawing takes a fraction of a second: epochs of a few
    seconds (a GPU) redraw only once FIGURE_SHARE of the time since the last drawing has paid for it."""

    def __init__(self, run_dir: Path, class_names, clock=time.monotonic):
        self.run_dir, self.class_names, self.clock = Path(run_dir), list(class_names), clock
        self.last_end: float | None = None
        self.cost = 0.0

    def epoch(self, rows: list[dict], val_confusion) -> bool:
        """Draw unless the last drawing was too recent; True when it drew."""
        from fervit.evaluation.plots import confusion_matrix_png, curves_png

        now = self.clock()
        if self.last_end is not None and self.cost > FIGURE_SHARE * (now - self.last_end):
            return False
        curves_png(rows, "loss", self.run_dir / "loss_curve.png", "cross-entropy loss")
        curves_png(rows, "acc", self.run_dir / "accuracy_curve.png", "accuracy")
        cm = val_confusion.double()
        acc = float(cm.diag().sum() / cm.sum().clamp(min=1))
        confusion_matrix_png(cm, self.class_names, self.run_dir / "confusion_matrix_val.png",
                             title=f"validation confusion matrix (row-normalised) after epoch {rows[-1]['epoch']}, "
                                   f"accuracy {acc:.1%}")
        self.last_end = self.clock()
        self.cost = self.last_end - now
        return True
