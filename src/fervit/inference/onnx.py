"""ONNX export with a dynamic batch and its parity check against PyTorch (the runtime side, which needs no
torch, is `fervit.inference.onnx_runtime`).

The exported file is self-describing: the checkpoint's JSON description (classes, input, model
config) is stored in the ONNX model's metadata under the key `fervit`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fervit.data.dataset import load_fer
from fervit.data.images import normalize
from fervit.data.tta import log_softmax
from fervit.errors import FervitError
from fervit.inference.onnx_runtime import META_KEY, OnnxClassifier, load_onnx, require
from fervit.io import atomic_write
from fervit.model_file import ModelFile
from fervit.progress import progress_bar

OPSET = 20
# ONNX Runtime and PyTorch run the same float32 math in a different order; measured differences on
# real faces are ~1e-6 in probability, so 1e-4 flags a wrong export while ignoring rounding.
PROB_ATOL = 1e-4


def export_onnx(model: torch.nn.Module, meta: ModelFile, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write `model` as one .onnx file taking (batch, 1, 48, 48) float32 'image' -> (batch, C) 'logits'."""
    require("onnxscript")
    onnx = require("onnx")
    path = Path(path)
    size = meta.input.size
    example = torch.zeros(2, meta.input.channels, size, size)  # batch 2, not 1: a batch of 1 could be specialised away
    # the exporter prints progress lines, deprecation warnings and log lines about torchvision ops it cannot
    # register (fervit has none) that say nothing to a fervit user
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(model.eval(), (example,), input_names=["image"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                        opset_version=opset, dynamo=True, verbose=False)
        finally:
            exporter_log.setLevel(level)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta.to_dict())})
    with atomic_write(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


def write_description(path: str | os.PathLike, meta: ModelFile) -> None:
    """Replace the description in an export's metadata (after `evaluate --calibrate` changed its temperature);
    the graph is untouched: it outputs raw logits and the predictor divides them by T."""
    onnx = require("onnx")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and others for a damaged file
        raise FervitError(f"cannot read the ONNX export '{path}' ({str(e).splitlines()[0][:200]})") from None
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta.to_dict())})
    with atomic_write(Path(path), "wb") as f:
        f.write(proto.SerializeToString())


def real_test_slice(root: str | os.PathLike, n: int = 512, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n images spread evenly over the root's test/ images, decoded as training does: (n, 48, 48), (n,).

    Reads through `load_fer`, so the decoded tensor cache a training run left behind is reused."""
    data = load_fer(root, progress=progress)
    test = torch.nonzero(data.folder == 1).flatten()
    if len(test) == 0:
        raise FervitError(f"no test/ images in '{root}' to check the export on; give --data ROOT of a FER-2013 "
                          "folder layout")
    pick = test[np.linspace(0, len(test) - 1, min(n, len(test))).round().astype(int)]
    return data.images[pick].numpy(), data.labels[pick].numpy()


@dataclass
class ParityReport:
    """How far ONNX Runtime is from PyTorch on a set of real faces."""

    images: int
    max_prob_diff: float
    max_logit_diff: float
    torch_accuracy: float
    onnx_accuracy: float
    disagreements: int  # faces whose predicted class differs

    @property
    def ok(self) -> bool:
        return self.max_prob_diff <= PROB_ATOL and self.torch_accuracy == self.onnx_accuracy

    def summary(self) -> str:
        return (f"{self.images} test faces: max |p_onnx - p_torch| = {self.max_prob_diff:.1e} (tolerance "
                f"{PROB_ATOL:.0e}), accuracy torch {self.torch_accuracy:.4f} vs onnx {self.onnx_accuracy:.4f}, "
                f"{self.disagreements} predictions differ")


@torch.inference_mode()
def check_parity(model: torch.nn.Module, onnx_classifier: OnnxClassifier, images: np.ndarray, labels: np.ndarray,
                 meta: ModelFile, batch_size: int = 256, progress: bool = False) -> ParityReport:
    """Run both backends on (N, 48, 48) uint8 faces and compare logits, probabilities and accuracy."""
    model.eval()
    t_logits, o_logits = [], []
    for start in progress_bar(range(0, len(images), batch_size), desc="checking ONNX against PyTorch", unit="batch",
                              quiet=not progress):
        x = normalize(torch.from_numpy(images[start:start + batch_size]), meta.input.mean, meta.input.std)
        t_logits.append(model(x).float().numpy())
        o_logits.append(onnx_classifier(x.numpy()))
    t, o = np.concatenate(t_logits), np.concatenate(o_logits)
    pt, po = np.exp(log_softmax(t)), np.exp(log_softmax(o))
    return ParityReport(images=len(images), max_prob_diff=float(np.abs(pt - po).max()),
                        max_logit_diff=float(np.abs(t - o).max()),
                        torch_accuracy=float((t.argmax(1) == labels).mean()),
                        onnx_accuracy=float((o.argmax(1) == labels).mean()),
                        disagreements=int((t.argmax(1) != o.argmax(1)).sum()))


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None,
                      data_root: str | None = None, check_images: int = 512,
                      progress: bool = False) -> tuple[Path, ParityReport | None]:
    """Export a run folder / checkpoint to ONNX (default: beside it) and check it on real test faces (by
    default those of the data the run was trained on).

    Raises `FervitError` when the check fails, and then leaves no .onnx file behind; `check_images=0` skips it.
    """
    from fervit.data.location import resolve_data_root
    from fervit.model_file import find_checkpoint
    from fervit.models.checkpoint import load_model
    from fervit.run_folder import read_config

    weights = find_checkpoint(checkpoint)
    model, meta = load_model(weights, "cpu")
    out = Path(output) if output else weights.with_suffix(".onnx")
    if out.suffix != ".onnx":
        raise FervitError(f"output '{out}' should end in .onnx")
    images = labels = None
    if check_images > 0:  # the faces first: a missing data folder must not leave an unchecked export behind
        run_cfg = read_config(weights.parent, "export")
        trained_on = run_cfg.data.root if run_cfg is not None else ""
        root = data_root or (trained_on if trained_on and Path(trained_on).is_dir() else "")
        images, labels = real_test_slice(resolve_data_root(root), check_images, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, meta, out)
    if images is None:
        return out, None
    try:
        classifier, _ = load_onnx(out)
        report = check_parity(model, classifier, images, labels, meta, 256, progress)
    except FervitError:
        out.unlink(missing_ok=True)
        raise
    except Exception as e:  # a check that cannot run must not leave an unchecked export behind either
        out.unlink(missing_ok=True)
        raise FervitError(f"the ONNX export '{out}' could not be checked against PyTorch ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); nothing was kept") from None
    if not report.ok:
        out.unlink(missing_ok=True)
        raise FervitError(f"the ONNX export '{out}' disagrees with PyTorch: {report.summary()}; nothing was kept")
    return out, report
