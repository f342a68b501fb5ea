"""The model file: safetensors weights plus a JSON description (`ModelFile`) that says how to rebuild
and feed the model. Training writes it, evaluation, inference and export read it; nothing here needs
the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fervit.config import DataConfig, ModelConfig, from_dict
from fervit.errors import FervitError
from fervit.io import atomic_write, write_json
from fervit.models.validate import (check_description, check_input, check_match, check_model, check_shapes,
                                   check_weights)

FORMAT = "fervit-model/1"
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


@dataclass
class InputSpec:
    """What the model takes: size x size images with `channels` channels, normalised as (x/255 - mean) / std."""

    size: int = 48
    channels: int = 1
    mean: float = 0.5
    std: float = 0.5


@dataclass
class SplitSpec:
    """What rebuilds the train/val/test split the model was chosen on, so that a model file moved out of
    its run folder is still evaluated on images it never trained on."""

    protocol: str = "seed"
    val_fraction: float = 0.1
    split_seed: int = 0
    drop_eval_duplicates: bool = False

    @classmethod
    def of(cls, data: DataConfig) -> SplitSpec:
        return cls(data.protocol, data.val_fraction, data.split_seed, data.drop_eval_duplicates)

    def data_config(self) -> DataConfig:
        """A DataConfig that makes this split (root and cache left at their defaults)."""
        return from_dict(DataConfig, dataclasses.asdict(self), "split.")


@dataclass
class ModelFile:
    """The JSON description beside a model's weights (`best_model.json`, `model.json`), and in an ONNX
    export's metadata. Written by `to_dict`, read by `from_dict`: nowhere else."""

    model: ModelConfig
    classes: list[str]
    input: InputSpec = field(default_factory=InputSpec)
    split: SplitSpec | None = None
    epoch: int | None = None  # provenance: the epoch these weights are from
    val_acc: float | None = None  # ... and its validation accuracy
    source_run: str = ""  # the run folder a shipped model came from
    dtype: str = ""  # the weights' float type when not float32
    metrics: dict = field(default_factory=dict)  # numbers measured on the file as shipped
    # calibration: probabilities are softmax(logits / temperature), fitted on the validation split
    # (fervit.evaluation.calibration); files written before it have none, which means 1
    temperature: float = 1.0
    format: str = FORMAT

    def to_dict(self) -> dict:
        d = {"format": self.format, "model": dataclasses.asdict(self.model), "classes": list(self.classes),
             "input": dataclasses.asdict(self.input)}
        if self.epoch is not None:
            d["epoch"] = self.epoch
        if self.val_acc is not None:
            d["val_acc"] = self.val_acc
        if self.split is not None:
            d["protocol"] = self.split.protocol  # the only split key the first model files had
            d["split"] = dataclasses.asdict(self.split)
        for key in ("source_run", "dtype", "metrics"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.temperature != 1.0:
            d["temperature"] = self.temperature
        return d

    @classmethod
    def from_dict(cls, d, source: str | Path) -> ModelFile:
        """Parse a description; a one-line FervitError naming `source` for anything that is not one."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise FervitError(f"'{source}' is not a fervit model description (expected format {FORMAT})")
        missing = [k for k in ("model", "classes", "input") if k not in d]
        if missing:
            raise FervitError(f"'{source}' is an incomplete model description (missing {missing[0]!r}); "
                              "re-export the checkpoint")
        check_description(d, source)
        try:
            split = d.get("split") or ({"protocol": d["protocol"]} if "protocol" in d else None)
            meta = cls(model=from_dict(ModelConfig, d["model"], "model."), classes=list(d["classes"]),
                       input=InputSpec(**d["input"]), split=SplitSpec(**split) if split is not None else None,
                       epoch=d.get("epoch"), val_acc=d.get("val_acc"), source_run=d.get("source_run", ""),
                       dtype=d.get("dtype", ""), metrics=dict(d.get("metrics") or {}),
                       temperature=_temperature(d.get("temperature", 1.0)))
        except (TypeError, ValueError, FervitError) as e:
            raise FervitError(f"'{source}' is a damaged model description ({e}); re-export the checkpoint") from None
        check_model(meta.model, meta.classes, meta.input.size, source)
        check_input(meta.input, meta.model, source)
        return meta

    @classmethod
    def read(cls, weights: Path) -> ModelFile:
        """The description beside `weights` (same name, .json)."""
        meta_path = weights.with_suffix(".json")
        try:
            d = json.loads(meta_path.read_bytes())
        except FileNotFoundError:
            raise FervitError(f"'{meta_path.name}' is missing beside '{weights}'; it says how to rebuild the "
                              "model") from None
        except OSError as e:
            raise FervitError(f"cannot read '{meta_path}' ({e.strerror or e})") from None
        except ValueError:  # JSONDecodeError, and UnicodeDecodeError for binary files
            raise FervitError(f"'{meta_path}' is damaged (not valid JSON); re-export the checkpoint") from None
        return cls.from_dict(d, meta_path)

    def write(self, weights: Path) -> None:
        write_json(weights.with_suffix(".json"), self.to_dict())


def _temperature(value) -> float:
    """A stored temperature: a positive finite number (T <= 0 would flip or break every probability)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a positive number, got {value!r}")
    return float(value)


def describe(model_cfg: ModelConfig, data: DataConfig | None = None, **provenance) -> ModelFile:
    """The description of a model trained with this config: fervit's classes and input normalisation."""
    from fervit.data.augment import MEAN, STD
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
    if path.suffix == ".json":  # e.g. a run's config.json or the description beside the weights: not a model
        weights = path.with_suffix(".safetensors")
        instead = f"'{weights}' (its weights)" if weights.is_file() else f"the run folder '{path.parent}'" \
            if (path.parent / WEIGHTS_NAME).is_file() else "a run folder or its best_model.safetensors"
        raise FervitError(f"'{path}' is a JSON file, not a model; give {instead}, or an .onnx export")
    if path.suffix != ".safetensors":
        raise FervitError(f"'{path}' is not a .safetensors checkpoint; fervit never loads pickled (.pt/.pth) files")
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
