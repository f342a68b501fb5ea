"""Models are created by name: `create_model("vit_cnn", depth=8)` or `build_model(cfg)`."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch.nn as nn

from fervit.config import ModelConfig
from fervit.errors import FervitError

_MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {}


def register_model(name: str):
    def wrap(fn):
        _MODELS[name] = fn
        return fn
    return wrap


def model_names() -> list[str]:
    return sorted(_MODELS)


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.name not in _MODELS:
        raise FervitError(f"unknown model '{cfg.name}'; choose one of {', '.join(model_names())}")
    if cfg.name != "timm" and (cfg.backbone or cfg.input_size):
        raise FervitError(f"model.backbone and model.input_size apply to model.name=timm only, not to {cfg.name}")
    if cfg.crop_size and not 0 < cfg.crop_size <= cfg.img_size:
        raise FervitError(f"model.crop_size must be 0 (no crop) or between 1 and img_size ({cfg.img_size}), "
                          f"got {cfg.crop_size}")
    if cfg.crop_size and cfg.name == "timm":
        raise FervitError("model.crop_size is not supported for timm backbones; use model.input_size to resize")
    try:
        return _MODELS[cfg.name](cfg)
    except ValueError as e:
        raise FervitError(f"cannot build {cfg.name}: {e}") from None


def create_model(name: str, **overrides) -> nn.Module:
    return build_model(dataclasses.replace(ModelConfig(name=name), **overrides))


def model_label(name: str, backbone: str = "") -> str:
    """How results name a model: the family, or `timm:<backbone>` for a timm backbone."""
    return f"timm:{backbone}" if name == "timm" and backbone else name


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that take no weight decay, as the model's modules declare them in a
    `no_weight_decay()` method (timm's convention: names relative to the declaring module)."""
    names = set()
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if callable(declare):
            names |= {f"{prefix}.{n}" if prefix else n for n in declare()}
    return names
