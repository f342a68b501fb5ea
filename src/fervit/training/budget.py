"""The wall-time budget (`train.time_budget_s`): after each epoch, fit the planned epochs to the time left."""

from __future__ import annotations

import statistics
import time

from fervit.training.distributed import broadcast_value
from fervit.training.resolution import epoch_cost

EARLY_EPOCHS = 4  # through this epoch the plan follows the estimate both ways; later it only comes down


def fit_time_budget(run, state, t_start: float) -> None:
    """Re-plan the epochs (and the cosine) to what fits in train.time_budget_s, from epoch 2 on.

    Epoch 1 carries compilation, so an epoch costs the median of those after it, or of the last three when
    that is slower: checked after every epoch, it sees a lasting slowdown (GPU neighbours that finish compiling)
    after two slow epochs, and one epoch slowed by a passing job does not cut the plan for good (a mean would:
    one epoch at 156 s among 118s cut a two-hour plan by six epochs). The time a slow epoch took is spent all
    the same, so a plan that proves too long is cut at the next checks, at most about an epoch late. Through epoch
    4 the estimate rests on one to three epochs, so the plan may rise again (up to train.epochs) when a slow
    early epoch turns out to have been the exception; the cosine has barely begun to fall then. After that it
    only ever comes down. Rank 0's clock decides for all.
    """
    cfg = run.cfg.train
    # seconds of an epoch at full size: progressive resizing's smaller epochs (augment.low_res) cost less
    full = [r["seconds"] / epoch_cost(run.cfg, i + 1, state.epochs) for i, r in enumerate(state.rows)]
    later = full[1:] or full[-1:]
    per_epoch = max(statistics.median(later), statistics.median(later[-3:]))
    left = cfg.time_budget_s - (time.time() - t_start)
    fit = broadcast_value(epochs_that_fit(run.cfg, state.epoch, per_epoch, left, max(cfg.epochs, state.epochs)),
                          run.ctx)
    planned = state.epochs
    if fit < planned:
        state.epochs = max(fit, state.epoch)
    elif state.epoch <= EARLY_EPOCHS and planned < cfg.epochs:
        state.epochs = min(fit, cfg.epochs)
    if state.epochs != planned:
        run.schedule.replan(run.steps_per_epoch * state.epochs)
        run.log(f"time budget {cfg.time_budget_s:.0f}s: training {state.epochs} epochs")


def epochs_that_fit(cfg, done: int, per_epoch: float, left: float, most: int) -> int:
    """The longest plan, at most `most` epochs, whose epochs after `done` cost no more than `left` seconds at
    `per_epoch` a full-size epoch. Each plan length has its own split of small and full-size epochs."""
    n = done
    while n < most and per_epoch * sum(epoch_cost(cfg, e, n + 1) for e in range(done + 1, n + 2)) <= left:
        n += 1
    return n
