"""The model file's description: the JSON beside a model's safetensors weights (`best_model.json`, `model.json`)
and in an ONNX export's metadata, which says how to rebuild and feed the model, and where the weights of a run
folder are.

Nothing here imports torch: ONNX Runtime inference (`fervit predict` with the `onnx` extra) reads descriptions
without it, and importing torch is most of a one-photo `fervit predict` (1.45 s of 2 s on the 2-core machine).
The weights themselves are written and read by `fervit.models.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fervit.config import DataConfig, ModelConfig, from_dict
from fervit.errors import FervitError
from fervit.io import write_json

FORMAT = "fervit-model/1"
WEIGHTS_NAME = "best_model.safetensors"


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


def check_description(d: dict, source: Path | str) -> None:
    """A one-line error unless the parts of a model description (already known to be fervit's format, with
    model, classes and input) have the right JSON types."""
    classes, model, size = d["classes"], d["model"], d["input"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise FervitError(f"'{source}': 'classes' must be a list of class names")
    if not isinstance(model, dict) or not isinstance(size, dict):
        raise FervitError(f"'{source}': 'model' and 'input' must be JSON objects")


def check_model(cfg: ModelConfig, classes: list[str], input_size: int, source: Path | str) -> None:
    """A one-line error unless the model's sizes are all positive and its class names and input size agree
    with the model that will be built."""
    sizes = {"img_size": cfg.img_size, "in_chans": cfg.in_chans, "num_classes": cfg.num_classes,
             "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_dim": cfg.mlp_dim,
             "patch_size": cfg.patch_size, "stem_convs": cfg.stem_convs, "stem_blocks": cfg.stem_blocks}
    bad = next((k for k, v in sizes.items() if v < (0 if k == "depth" else 1)), None)
    if bad:
        raise FervitError(f"'{source}': model.{bad} must be at least {0 if bad == 'depth' else 1}, got {sizes[bad]}")
    if cfg.name in ("vit_cnn", "vit_resnet", "vit_vgg") and (not cfg.stem_channels or min(cfg.stem_channels) < 1):
        raise FervitError(f"'{source}': model.stem_channels must list at least one positive channel count, "
                          f"got {list(cfg.stem_channels)}")
    if len(classes) != cfg.num_classes:
        raise FervitError(f"'{source}' names {len(classes)} classes but its model has {cfg.num_classes} "
                          "outputs; the two must agree")
    if input_size != cfg.img_size:
        raise FervitError(f"'{source}' says the input is {input_size} px but its model is built for "
                          f"{cfg.img_size} px images; the two must agree")


def check_input(spec, cfg: ModelConfig, source: Path | str) -> None:
    """A one-line error unless the input normalisation can mean something: a finite mean, a finite std above 0
    (a std of 0 divides every face by zero, so every prediction is NaN), and the model's channel count."""
    def finite(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not finite(spec.mean):
        raise FervitError(f"'{source}': input.mean must be a finite number, got {spec.mean!r}")
    if not finite(spec.std) or spec.std <= 0:
        raise FervitError(f"'{source}': input.std must be a finite number above 0, got {spec.std!r}")
    if spec.channels != cfg.in_chans:
        raise FervitError(f"'{source}': input.channels is {spec.channels!r} but its model takes {cfg.in_chans}; "
                          "the two must agree")
