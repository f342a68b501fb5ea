"""`fervit evaluate`: re-evaluate any saved model on a split and regenerate its figures and results."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from fervit.config import RunConfig
from fervit.data.location import resolve_data_root
from fervit.data.tta import tta_mode
from fervit.data.dataset import load_fer
from fervit.data.splits import make_splits
from fervit.errors import FervitError
from fervit.evaluation.calibration import calibrate_run, calibration_summary
from fervit.evaluation.evaluate import evaluate, predict_logits, split_report
from fervit.evaluation.plots import curves_png
from fervit.models import count_parameters, model_label
from fervit.run_folder import (METRICS, RESULTS, DamagedResults, Results, read_config, read_metrics, read_results,
                               write_results)
from fervit.device import resolve_amp, resolve_device
from fervit.model_file import ModelFile, find_checkpoint
from fervit.models.checkpoint import load_model


EVAL_BATCH = 1024  # the batch evaluation has always used (the figures recorded were measured with it)


def split_config_from_meta(weights: Path) -> RunConfig:
    """For a checkpoint away from its run folder (e.g. the shipped model): the data split recorded in its JSON
    description, so it is still evaluated on the images it was not trained on."""
    try:
        split = ModelFile.read(weights).split
    except FervitError:
        return RunConfig()  # load_model reports a missing or damaged description in its own words
    return RunConfig(data=split.data_config()) if split is not None else RunConfig()


def evaluate_checkpoint(checkpoint: str | list[str], split: str = "test", data_root: str | None = None,
                        protocol: str | None = None, device: str = "auto", tta: bool | str = "none",
                        cache_dir: str | None = None, strict: bool = False, output: str | None = None,
                        calibrate: bool = False, announce=None, progress: bool = False) -> str:
    """Evaluate and write results.json (the split's section) plus its confusion matrix; returns a summary.

    Several checkpoints make an ensemble: their softmax probabilities are averaged. The data protocol
    comes from the first checkpoint's run folder. `calibrate`: also fit the temperature on the validation
    split, write it into the model file (and an ONNX export beside it), and add the calibration section
    and reliability diagram (fervit.evaluation.calibration). `announce(weights, meta)` runs for each model
    once it has loaded, before the data is read (the CLI names the models).
    """
    checkpoints = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    all_weights = [find_checkpoint(c) for c in checkpoints]
    weights = all_weights[0]
    run_dir = weights.parent
    # what the request itself gets wrong is said before the data is looked for
    if len(all_weights) > 1 and not output:
        raise FervitError("an ensemble of several checkpoints needs --output DIR for its results")
    if calibrate and len(all_weights) > 1:
        raise FervitError("--calibrate fits one model's temperature; give a single checkpoint")
    if calibrate and not os.access(weights.with_suffix(".json"), os.W_OK):
        raise FervitError(f"--calibrate writes the temperature into '{weights.with_suffix('.json')}', which cannot "
                          "be written; copy the run folder somewhere writable")
    cfg = read_config(run_dir, "evaluate") or split_config_from_meta(weights)
    if data_root:
        cfg.data.root = data_root
    elif cfg.data.root and not Path(cfg.data.root).expanduser().exists():
        cfg.data.root = ""  # the folder the run trained on is gone (or was relative to elsewhere): the usual places
    if protocol:
        cfg.data.protocol = protocol
    if cache_dir:
        cfg.data.cache_dir = cache_dir
    out_dir = Path(output) if output else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise FervitError(f"cannot write results into '{out_dir}'; pass --output DIR")
    try:
        tta = tta_mode(tta)
    except ValueError as e:
        raise FervitError(str(e)) from None
    dev = resolve_device(device)
    models = [load_model(w, dev) for w in all_weights]
    for w, (_, m) in zip(all_weights, models):  # name the model that cannot, before any data is read
        if tta == "ten_crop" and not m.model.takes_crops():
            raise FervitError(f"{w}: ten-crop TTA needs a model trained on crops smaller than the face "
                              "(model.crop_size); this one takes the whole face: use --tta mirror")
    if announce is not None:
        for w, (_, m) in zip(all_weights, models):
            announce(w, m)
    model, meta = models[0]
    cfg.data.root = resolve_data_root(cfg.data.root)  # after the checks on the request and the model files
    data = load_fer(cfg.data.root, cfg.data.cache_dir or None, strict, progress=progress)
    splits = make_splits(data, cfg.data.protocol, cfg.data.val_fraction, cfg.data.split_seed,
                         cfg.data.drop_eval_duplicates)
    idx = splits.val if split == "val" else splits.test
    if len(idx) == 0:
        raise FervitError(f"the {cfg.data.protocol} protocol has no {split} images in '{cfg.data.root}'")
    amp = resolve_amp("auto", dev)
    images, labels, idx_dev = data.images.to(dev), data.labels.to(dev), idx.to(dev)
    if len(models) == 1:
        res = evaluate(model, images, labels, idx_dev, EVAL_BATCH, amp, tta, (meta.input.mean, meta.input.std),
                       progress)
    else:
        res = evaluate_ensemble(models, images, labels, idx_dev, amp, tta, progress)
    calibration = None
    if calibrate:
        if len(splits.val) == 0:
            raise FervitError(f"the {cfg.data.protocol} protocol has no validation images in '{cfg.data.root}' "
                              "to fit the temperature on")
        second = "val" if split == "test" else "test"  # calibration measures both splits
        second_idx = (splits.val if second == "val" else splits.test).to(dev)
        both = {split: res, second: evaluate(model, images, labels, second_idx, EVAL_BATCH, amp, tta,
                                             (meta.input.mean, meta.input.std))}
        calibration = calibrate_run(out_dir, weights, both["val"], both["test"])
    figure = "confusion_matrix.png" if split == "test" else "confusion_matrix_val.png"
    report = split_report(res, "test" if split == "test" else "validation", out_dir, figure)
    try:
        results = read_results(out_dir) or Results()
    except DamagedResults:
        warnings.warn(f"'{out_dir / RESULTS}' was damaged or not a fervit results file; it is rewritten", stacklevel=2)
        results = Results()
    results.model = model_label(meta.model.name, meta.model.backbone)
    results.params = sum(count_parameters(m) for m, _ in models)
    results.protocol, results.data_root = cfg.data.protocol, str(cfg.data.root)
    results.split_sizes, results.classes = splits.sizes(), meta.classes
    results.checkpoint = str(weights) if len(models) == 1 else [str(w) for w in all_weights]
    for other in ("val", "test"):  # each split says which test-time augmentation its numbers used
        if isinstance(getattr(results, other), dict):
            getattr(results, other).setdefault("tta", str(results.tta if results.tta is not None else "none"))
    results.tta = None  # training's setting, now in each split
    setattr(results, split, {**report, "tta": tta})
    if calibration is not None:
        results.calibration = {**calibration, "tta": tta}
    results_path = write_results(out_dir, results)
    if (run_dir / METRICS).is_file():
        try:
            rows = read_metrics(run_dir)
        except FervitError as e:  # the evaluation itself is written; only the training curves are missing
            warnings.warn(f"{e}; loss and accuracy curves are not drawn", stacklevel=2)
            rows = []
        if rows:
            curves_png(rows, "loss", out_dir / "loss_curve.png", "cross-entropy loss")
            curves_png(rows, "acc", out_dir / "accuracy_curve.png", "accuracy")
    what = meta.model.name if len(models) == 1 else f"ensemble of {len(models)}"
    calibrated = "" if calibration is None else (f"\n{calibration_summary(calibration)}, written into "
                                                 f"{weights.with_suffix('.json')}")
    return (f"{what}{'' if tta == 'none' else f' +{tta}'} on {cfg.data.protocol}/{split} ({len(idx)} images): accuracy "
            f"{report['accuracy']:.4f}, macro F1 {report['macro_avg']['f1']:.4f} -> {results_path}{calibrated}")


def evaluate_ensemble(models, images, labels, indices, amp_dtype, tta: bool | str, progress: bool = False) -> dict:
    """Average the members' softmax probabilities; the result has evaluate()'s shape. `models`: (model, its
    ModelFile) pairs, each fed with the normalisation its file records."""
    import torch.nn.functional as F

    probs = sum(F.softmax(predict_logits(m, images, indices, EVAL_BATCH, amp_dtype, tta,
                                         (meta.input.mean, meta.input.std), progress), -1)
                for m, meta in models) / len(models)
    logp = probs.clamp(min=1e-12).log()
    y = labels[indices]
    return {"loss": float(F.nll_loss(logp, y)), "acc": float((probs.argmax(-1) == y).float().mean()),
            "preds": probs.argmax(-1).cpu(), "labels": y.cpu(), "logits": logp.cpu()}
