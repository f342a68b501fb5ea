"""Test-time augmentation: the views of each face and how their predictions are averaged, shared by
`fervit evaluate` (and training's final evaluation) and the predictor behind `fervit predict` and `fervit serve`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TTA_MODES = ("none", "mirror", "ten_crop")


def tta_mode(value) -> str:
    """none | mirror | ten_crop from a config or flag value (old configs say true/false for mirror/none)."""
    text = str(value).strip().lower().replace("-", "_")
    mode = {"true": "mirror", "false": "none", "": "none", "0": "none", "1": "mirror"}.get(text, text)
    if mode not in TTA_MODES:
        raise ValueError(f"test-time augmentation must be one of {', '.join(TTA_MODES)}, got {value!r}")
    return mode


def tta_views(x: torch.Tensor, mode: str, crop_size: int = 0) -> torch.Tensor:
    """(B, C, S, S) normalised faces -> (V*B, C, S, S): the views whose predictions TTA averages, view-major.

    mirror: the face and its mirror (V=2). ten_crop: the four corner and the centre crop_size windows and their
    mirrors (V=10), as published FER-2013 CNNs evaluate. Each window is moved to the centre of a full-size
    view (a shift of at most (S - crop_size) / 2, so the wrapped-around pixels stay outside the window), because a
    cropping model takes the centre of whatever face it gets: every backend keeps its S x S input.
    """
    mode = tta_mode(mode)
    if mode == "none":
        return x
    if mode == "mirror":
        return torch.cat([x, x.flip(-1)])
    size = x.shape[-1]
    if not 0 < crop_size < size:
        raise ValueError(f"ten-crop TTA needs a model trained on crops smaller than the {size}px face "
                         f"(model.crop_size); this one takes the whole face: use mirror instead")
    m = (size - crop_size) // 2
    shifts = [(0, 0), (m, m), (m, -m), (-m, m), (-m, -m)]  # centre, then windows at the four corners
    crops = torch.cat([x.roll(s, dims=(-2, -1)) for s in shifts])
    return torch.cat([crops, crops.flip(-1)])


def mean_log_probs(logits: torch.Tensor, faces: int) -> torch.Tensor:
    """(V*B, C) logits of `tta_views`' views -> (B, C): the mean over the V views of each face's
    log-probabilities (B = `faces`; a single view gives its log-softmax)."""
    views = F.log_softmax(logits, -1)
    return views.view(-1, faces, views.shape[-1]).mean(0)
