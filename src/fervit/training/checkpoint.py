"""Model checkpoints as safetensors weights plus a JSON sidecar that says how to rebuild the model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fervit.config import ModelConfig
from fervit.errors import FervitError
from fervit.io import atomic_write, write_json
from fervit.models.validate import FORMAT, check_shapes, check_weights, read_description

WEIGHTS_NAME = "best_model.safetensors"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / DDP / EMA wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch.optim.swa_utils.AveragedModel):
            model = model.module
        else:
            return model


def save_model(model: nn.Module, model_cfg: ModelConfig, path: str | Path, extra: dict | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write `path` (.safetensors) and `path` with .json: the weights and how to rebuild the model."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    from fervit.data.dataset import CLASSES

    meta = {"format": FORMAT, "model": _asdict(model_cfg), "classes": list(CLASSES),
            "input": {"size": model_cfg.img_size, "channels": 1, "mean": 0.5, "std": 0.5}}
    meta.update(extra or {})
    check_weights(state, path)  # never write a checkpoint that load_model would refuse
    with atomic_write(path, "wb") as f:
        f.write(save(state, metadata={"format": FORMAT}))
    write_json(path.with_suffix(".json"), meta)
    return path


def _asdict(cfg: ModelConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def find_checkpoint(path: str | Path) -> Path:
    """A run folder or a .safetensors file -> the weights file, or a one-line error."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / WEIGHTS_NAME
        if not candidate.is_file():
            raise FervitError(f"no {WEIGHTS_NAME} in '{path}'; give a run folder written by `fervit train` "
                              "or a .safetensors checkpoint")
        return candidate
    if not path.is_file():
        raise FervitError(f"checkpoint '{path}' does not exist; give a run folder or a .safetensors file")
    if path.suffix != ".safetensors":
        raise FervitError(f"'{path}' is not a .safetensors checkpoint; fervit never loads pickled (.pt/.pth) files")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from its checkpoint; returns (model in eval mode, the JSON metadata)."""
    from fervit.models import build_model

    weights = find_checkpoint(path)
    meta_path = weights.with_suffix(".json")
    meta, model_cfg = read_description(meta_path, weights)
    check_shapes(model_cfg, weights, meta_path)  # before anything is allocated
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise FervitError(f"checkpoint '{weights}' is damaged or not a safetensors file ({e})") from None
    check_weights(state, weights)
    model = build_model(model_cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape of {bad_shape[0]} is {tuple(state[bad_shape[0]].shape)}, "
                       f"expected {tuple(expected[bad_shape[0]].shape)}")
        raise FervitError(f"checkpoint '{weights}' does not match a {model_cfg.name} model as described in "
                          f"'{meta_path.name}' ({detail})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval(), meta
