"""Starting a model from pretrained weights (model.pretrained): a local .safetensors file, never a pickle."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_file

from fervit.errors import FervitError


def load_pretrained(model: nn.Module, path: str, log=print) -> None:
    """Load matching weights from a local .safetensors file (a fervit checkpoint or a bare state dict)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FervitError(f"model.pretrained '{p}' does not exist; give a local .safetensors file")
    if p.suffix != ".safetensors":
        raise FervitError(f"model.pretrained '{p}' is not a .safetensors file; fervit never loads pickled weights")
    if hasattr(model, "load_pretrained"):  # e.g. a timm backbone: its own loader adapts stem, head and positions
        model.load_pretrained(p, log)
        return
    try:
        state = load_file(p)
    except Exception as e:
        raise FervitError(f"model.pretrained '{p}' is not a readable safetensors file ({e})") from None
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise FervitError(f"no tensor in '{p}' matches this model's names and shapes; is it a checkpoint of "
                          "another architecture?")
    model.load_state_dict(usable, strict=False)
    log(f"loaded {len(usable)}/{len(own)} tensors from {p}")
