"""The end of a run: the best model reloaded and measured on val and test, its figures, and results.json."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fervit.config import RunConfig
from fervit.data.dataset import CLASSES, FerData
from fervit.data.splits import Splits
from fervit.errors import FervitError
from fervit.evaluation.calibration import calibrate_run, calibration_summary
from fervit.evaluation.evaluate import evaluate, split_report
from fervit.evaluation.plots import curves_png
from fervit.models import model_label
from fervit.models.checkpoint import load_model
from fervit.run_folder import WEIGHTS, Results, write_results
from fervit.training.distributed import barrier


def finish(run, state, interrupted: bool, t_start: float) -> Path:
    """After the last epoch of the trainer's `run` (its TrainState `state`): rank 0 evaluates the best model and
    writes results.json. The `last` checkpoint stays, so that
    `--resume --epochs N` can train the run further."""
    if not state.rows:
        raise FervitError(f"training stopped before the first epoch finished; nothing to evaluate in {run.run_dir}")
    if run.ctx.is_main:
        extra = {"best_epoch": state.best_epoch, "interrupted": interrupted, "epochs_planned": state.epochs,
                 "wall_seconds": time.time() - t_start, "runtime": run.runtime}
        if state.stop_reason:
            extra["stopped"] = state.stop_reason
        if run.ctx.enabled:
            extra["world_size"] = run.ctx.world_size
        finish_run(run.run_dir, run.cfg, run.data, run.splits, state.rows, run.ctx.device, run.step.amp_dtype,
                   run.n_params, extra, quiet=run.quiet)
    barrier(run.ctx)
    return run.run_dir


def finish_run(run_dir: Path, cfg: RunConfig, data: FerData, splits: Splits, rows: list[dict],
               device: torch.device, amp_dtype, n_params: int, extra: dict, quiet: bool = False) -> Results:
    """Reload the best checkpoint, evaluate val and test, write curves, confusion matrix and results.json."""
    curves_png(rows, "loss", run_dir / "loss_curve.png", "cross-entropy loss")
    curves_png(rows, "acc", run_dir / "accuracy_curve.png", "accuracy")
    model, _ = load_model(run_dir, device)
    images, labels = data.images.to(device), data.labels.to(device)
    tta, bs = cfg.train.tta, cfg.train.eval_batch_size
    val, test = (evaluate(model, images, labels, split.to(device), bs, amp_dtype, tta)
                 for split in (splits.val, splits.test))
    # with train.tta on, the one-view scores too: `fervit predict` runs one view unless told otherwise, so that is
    # what the temperature is fitted to, and the two figures stay apart in results.json
    one_val, one_test = (val, test) if tta == "none" else (
        evaluate(model, images, labels, split.to(device), bs, amp_dtype) for split in (splits.val, splits.test))
    results = Results(
        model=model_label(cfg.model.name, cfg.model.backbone), params=n_params, protocol=cfg.data.protocol,
        data_root=str(cfg.data.root), split_sizes=splits.sizes(), classes=list(CLASSES), epochs_completed=len(rows),
        epochs_planned=extra.pop("epochs_planned", len(rows)), best_val_acc=max(r["val_acc"] for r in rows),
        tta=tta, device=str(device), torch=torch.__version__, **extra,
        val={**split_report(val, "validation"), "tta": tta},
        test={**split_report(test, "test", run_dir, "confusion_matrix.png"), "tta": tta},
        single_view=None if tta == "none" else {"val": one_val["acc"], "test": one_test["acc"]})
    results.calibration = calibrate_run(run_dir, run_dir / WEIGHTS, one_val, one_test)  # T into the model file
    write_results(run_dir, results)
    if not quiet:
        views = "" if tta == "none" else (f" ({tta} TTA; one view: val {one_val['acc']:.4f}, "
                                          f"test {one_test['acc']:.4f})")
        print(f"best epoch {results.best_epoch} | val acc {results.val['accuracy']:.4f} | "
              f"test acc {results.test['accuracy']:.4f} | macro F1 {results.test['macro_avg']['f1']:.4f}{views} | "
              f"{run_dir}")
        print(calibration_summary(results.calibration))
    return results


