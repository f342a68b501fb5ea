"""The model file's weights: safetensors, written beside the JSON description (`fervit.model_file.ModelFile`) that
says how to rebuild and feed the model. Training writes them, evaluation, inference and export read them; nothing
here needs the trainer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fervit.config import DataConfig, ModelConfig
from fervit.errors import FervitError
from fervit.io import atomic_write
from fervit.model_file import FORMAT, InputSpec, ModelFile, SplitSpec, find_checkpoint
from fervit.models.validate import check_match, check_shapes, check_weights

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


def describe(model_cfg: ModelConfig, data: DataConfig | None = None, **provenance) -> ModelFile:
    """The description of a model trained with this config: fervit's classes and input normalisation."""
    from fervit.data.images import MEAN, STD
    from fervit.data.dataset import CLASSES

    return ModelFile(model=model_cfg, classes=list(CLASSES),
                     input=InputSpec(size=model_cfg.img_size, channels=model_cfg.in_chans, mean=MEAN, std=STD),
                     split=SplitSpec.of(data) if data is not None else None, **provenance)


def save_model(model: nn.Module, description: ModelFile, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `path` (.safetensors) and `path` with .json: the weights and their description."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    check_weights(state, path)  # never write a checkpoint that load_model would refuse
    with atomic_write(path, "wb") as f:
        f.write(save(state, metadata={"format": FORMAT}))
    description.write(path)
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelFile]:
    """Rebuild a model from its checkpoint; returns (model in eval mode, its description)."""
    from fervit.models import build_model

    weights = find_checkpoint(path)
    meta = ModelFile.read(weights)
    model_cfg = meta.model
    check_shapes(model_cfg, weights, weights.with_suffix(".json"))  # before anything is allocated
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise FervitError(f"checkpoint '{weights}' is damaged or not a safetensors file ({e})") from None
    check_weights(state, weights)
    model = build_model(model_cfg)
    # again after the real build: a timm model may not build on the meta device, so check_shapes let it pass
    check_match({k: tuple(v.shape) for k, v in model.state_dict().items()},
                {k: tuple(v.shape) for k, v in state.items()}, model_cfg.name, weights, weights.with_suffix(".json"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval(), meta
