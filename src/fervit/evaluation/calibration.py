"""Calibrated probabilities: temperature scaling (Guo et al., 2017) fitted on the validation split.

A trained network's softmax is usually over-confident: of the faces it calls "happy 90%", fewer than 90%
are happy. Dividing every logit by one scalar T > 1 softens the probabilities without changing any
argmax, so accuracy is untouched. T is the value that minimises the negative log-likelihood of the
validation labels (PublicTest under the fer2013 protocol, never the test split the results report),
and it is stored in the model file's description (`ModelFile.temperature`; files without it mean T = 1).
The expected calibration error (ECE) is measured with 15 equal-width bins on the top label's confidence.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fervit.errors import FervitError
from fervit.model_file import ModelFile

ECE_BINS = 15
# the search interval for T: wide enough for any model fervit trains (measured fits are ~1-2), and bounded
# so that a validation set the model gets entirely right (NLL falls forever as T -> 0) still gives a number
T_MIN, T_MAX = 0.05, 20.0
FIGURE = "reliability_diagram.png"


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, low: float = T_MIN, high: float = T_MAX) -> float:
    """The T in [low, high] that minimises the NLL of `labels` under softmax(logits / T).

    A golden-section search on log T: the NLL is convex in 1/T, so it has one minimum along log T and the
    search cannot stop in a wrong one; unlike LBFGS it needs no step size and always stays in bounds.
    """
    logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
    if len(labels) == 0 or not bool(torch.isfinite(logits).all()):
        return 1.0  # nothing to fit on: keep the model's own probabilities
    def f(u):
        return nll(logits, labels, math.exp(u))

    a, b = math.log(low), math.log(high)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(80):  # the interval shrinks 0.618x a step: 80 steps reach float precision
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(math.exp((a + b) / 2))


def reliability(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                bins: int = ECE_BINS) -> dict:
    """Top-label calibration in `bins` equal-width confidence bins: the ECE, and each bin's count, mean
    confidence and accuracy (what the reliability diagram draws)."""
    probs = F.softmax(logits.double().cpu() / temperature, -1)
    conf, pred = probs.max(-1)
    correct = (pred == labels.long().cpu()).double()
    # bin k holds k/bins < confidence <= (k+1)/bins
    which = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    conf_sum = torch.bincount(which, conf, minlength=bins)
    acc_sum = torch.bincount(which, correct, minlength=bins)
    n = max(float(count.sum()), 1.0)
    ece = float(((acc_sum - conf_sum).abs()).sum() / n)  # sum over bins of |B|/n * |acc(B) - conf(B)|
    safe = count.clamp(min=1)
    return {"ece": ece, "count": count.long().tolist(), "confidence": (conf_sum / safe).tolist(),
            "accuracy": (acc_sum / safe).tolist()}


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, bins: int = ECE_BINS) -> float:
    """Expected calibration error of softmax(logits / temperature), top label, `bins` equal-width bins."""
    return reliability(logits, labels, temperature, bins)["ece"]


def calibrate(splits: dict[str, dict], figure: Path | None = None, fit_on: str = "val") -> dict:
    """Fit T on `splits[fit_on]` and measure every split before and after.

    `splits`: name -> an `evaluate()` result (its "logits" and "labels"). Returns the results.json section;
    draws the reliability diagram at `figure` when given."""
    fit = splits[fit_on]
    t = fit_temperature(fit["logits"], fit["labels"])
    section: dict = {"method": "temperature scaling", "temperature": t, "fitted_on": fit_on, "bins": ECE_BINS}
    diagrams = {}
    for name, res in splits.items():
        before, after = reliability(res["logits"], res["labels"]), reliability(res["logits"], res["labels"], t)
        section[name] = {"ece_before": before["ece"], "ece_after": after["ece"],
                         "nll_before": nll(res["logits"], res["labels"]), "nll_after": nll(res["logits"], res["labels"], t),
                         "images": len(res["labels"])}
        diagrams[name] = (before, after)
    if figure is not None:
        from fervit.evaluation.plots import reliability_png

        reliability_png(diagrams, t, figure)
        section["figure"] = figure.name
    return section


def write_temperature(weights: Path, temperature: float) -> ModelFile:
    """Store T in the description beside `weights` (the weights themselves are unchanged)."""
    meta = ModelFile.read(weights)
    meta.temperature = temperature
    meta.write(weights)
    return meta


def calibrate_run(out_dir: Path, weights: Path, val: dict, test: dict) -> dict:
    """After training, or `fervit evaluate --calibrate` for an old run: fit T on the validation results, write
    it into the model file, draw the reliability diagram into `out_dir`; returns the results.json section.

    An ONNX export beside the weights is kept in step: its metadata carries the description, so it would
    otherwise still say the old T (its graph is untouched: it outputs raw logits, the predictor divides)."""
    section = calibrate({"val": val, "test": test}, Path(out_dir) / FIGURE)
    meta = write_temperature(weights, section["temperature"])
    onnx_path = Path(weights).with_suffix(".onnx")
    if onnx_path.is_file():
        try:
            from fervit.inference.onnx import write_description

            write_description(onnx_path, meta)
        except FervitError as e:
            warnings.warn(f"{e}; '{onnx_path}' keeps its old temperature: re-run `fervit export`", stacklevel=2)
    return section

def calibration_summary(section: dict) -> str:
    """One line: T and the ECE before -> after on each split measured."""
    parts = [f"{name} {s['ece_before']:.3f} -> {s['ece_after']:.3f}" for name, s in section.items()
             if isinstance(s, dict)]
    return f"calibration: temperature {section['temperature']:.3f} | ECE {', '.join(parts)}"
