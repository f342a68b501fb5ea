"""Test-time augmentation: the views of each face and how their predictions are averaged, shared by
`fervit evaluate` (and training's final evaluation) and the predictor behind `fervit predict` and `fervit serve`.

Each function takes torch tensors (evaluation, on any device) or numpy arrays (the ONNX Runtime predictor, which
never imports torch) and returns the same kind. torch's and numpy's flip, roll and concatenate take the same
positional arguments, so one body serves both; torch is never imported here: a tensor means it is loaded.
"""

from __future__ import annotations

import sys

import numpy as np

TTA_MODES = ("none", "mirror", "ten_crop")


def tta_mode(value) -> str:
    """none | mirror | ten_crop from a config or flag value (old configs say true/false for mirror/none)."""
    text = str(value).strip().lower().replace("-", "_")
    mode = {"true": "mirror", "false": "none", "": "none", "0": "none", "1": "mirror"}.get(text, text)
    if mode not in TTA_MODES:
        raise ValueError(f"test-time augmentation must be one of {', '.join(TTA_MODES)}, got {value!r}")
    return mode


def _xp(x):
    """The array library of `x`: numpy for an array, else torch (already imported by whoever made the tensor)."""
    return np if isinstance(x, np.ndarray) else sys.modules["torch"]


def tta_views(x, mode: str, crop_size: int = 0):
    """(B, C, S, S) normalised faces -> (V*B, C, S, S): the views whose predictions TTA averages, view-major.

    mirror: the face and its mirror (V=2). ten_crop: the four corner and the centre crop_size windows and their
    mirrors (V=10), as published FER-2013 CNNs evaluate. Each window is moved to the centre of a full-size
    view (a shift of at most (S - crop_size) / 2, so the wrapped-around pixels stay outside the window), because a
    cropping model takes the centre of whatever face it gets: every backend keeps its S x S input.
    """
    mode, xp = tta_mode(mode), _xp(x)
    if mode == "none":
        return x
    if mode == "mirror":
        return xp.concatenate([x, xp.flip(x, (-1,))])
    size = x.shape[-1]
    if not 0 < crop_size < size:
        raise ValueError(f"ten-crop TTA needs a model trained on crops smaller than the {size}px face "
                         f"(model.crop_size); this one takes the whole face: use mirror instead")
    m = (size - crop_size) // 2
    shifts = [(0, 0), (m, m), (m, -m), (-m, m), (-m, -m)]  # centre, then windows at the four corners
    crops = xp.concatenate([xp.roll(x, s, (-2, -1)) for s in shifts])
    return xp.concatenate([crops, xp.flip(crops, (-1,))])


def log_softmax(logits):
    """log_softmax over the last axis, of a tensor or an array."""
    if isinstance(logits, np.ndarray):
        z = logits - logits.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    return _xp(logits).log_softmax(logits, -1)


def mean_log_probs(logits, faces: int):
    """(V*B, C) logits of `tta_views`' views -> (B, C): the mean over the V views of each face's
    log-probabilities (B = `faces`; a single view gives its log-softmax)."""
    views = log_softmax(logits)
    return views.reshape(-1, faces, views.shape[-1]).mean(0)
