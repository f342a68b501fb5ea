"""One configuration tree for a run: presets are JSON files, the CLI only overrides fields.

`RunConfig` serialises to the run folder's `config.json` and back, so any run can be rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from fervit.errors import FervitError


@dataclass
class DataConfig:
    root: str = ""  # empty: $FERVIT_DATA, else the first of fervit.data.location.data_search_path() that exists
    # seed: 90/10 split of train/; fer2013: Training/PublicTest/PrivateTest
    protocol: Literal["seed", "fer2013"] = "seed"
    val_fraction: float = 0.1
    split_seed: int = 0
    cache_dir: str = ""  # empty: the user's cache dir (platformdirs)
    strict: bool = False  # corrupt files are fatal instead of skipped
    drop_eval_duplicates: bool = False  # drop training images pixel-identical to a val/test image


@dataclass
class AugmentConfig:
    enabled: bool = True
    hflip: float = 0.5  # probability
    rotation: float = 10.0  # degrees, uniform in [-r, r]
    translate: float = 0.1  # fraction of the image, uniform in [-t, t]
    scale: tuple[float, float] = (0.8, 1.0)  # random resized crop: area fraction kept
    ratio: tuple[float, float] = (0.75, 1.3333)  # random resized crop: aspect ratio
    brightness: float = 0.2  # factor uniform in [1-b, 1+b]
    contrast: float = 0.2  # factor uniform in [1-c, 1+c]
    erase_p: float = 0.25  # random erasing probability
    erase_scale: tuple[float, float] = (0.02, 0.2)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    mixup_alpha: float = 0.0  # 0 disables
    cutmix_alpha: float = 0.0  # 0 disables
    mix_p: float = 1.0  # probability that a batch is mixed when mixup/cutmix is on
    low_res: int = 0  # progressive resizing: >0 trains the first epochs on images sampled at this side; 0: off
    low_res_until: float = 0.5  # with low_res: the fraction of the planned epochs it lasts (training.resolution)

    def scaled(self, strength: float) -> AugmentConfig:
        """A copy with every geometric and photometric amount times `strength` (0: none, 1: as is); the
        crop keeps at least 5% of the area, erasing stays a probability, and every amount stays inside its
        RANGES entry (so the run's config.json reads back)."""
        lo, hi = self.scale
        return dataclasses.replace(
            self, rotation=min(self.rotation * strength, 180.0), translate=min(self.translate * strength, 1.0),
            brightness=min(self.brightness * strength, 1.0), contrast=min(self.contrast * strength, 1.0),
            erase_p=min(self.erase_p * strength, 1.0), scale=(min(max(1 - (1 - lo) * strength, 0.05), hi), hi))


@dataclass
class ModelConfig:
    name: str = "vit_cnn"
    img_size: int = 48
    in_chans: int = 1
    num_classes: int = 7
    patch_size: int = 8  # vit_patch only
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_dim: int = 768
    dropout: float = 0.15
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    head_hidden: int = 192  # 0: a single linear head
    # what the head reads: cls (the [CLS] token) | mean (the average of the other tokens)
    pool: Literal["cls", "mean"] = "cls"
    stem_channels: tuple[int, ...] = (32, 64)  # vit_cnn: one stage per entry, each halves H and W
    stem_convs: int = 1  # vit_cnn: 3x3 conv+BN+ReLU layers per stage before its max-pool
    stem_blocks: int = 2  # vit_resnet: residual blocks per stage (stages after the first halve H and W)
    crop_size: int = 0  # >0: the model works on crop_size crops; training draws random crops, evaluation and
    #                     inference take the centre of the img_size face (ten-crop TTA: corners + centre, mirrored)
    pretrained: str = ""  # local weights file (safetensors) loaded before training
    backbone: str = ""  # timm only: the timm model name, e.g. resnet18, convnext_atto, vit_tiny_patch16_224
    input_size: int = 0  # timm only: faces are resized to this square size inside the model; 0 keeps img_size

    def trained_side(self) -> int:
        """The side of the images training feeds the model: its crop (model.crop_size), else the whole face."""
        return self.crop_size or self.img_size

    def takes_crops(self) -> bool:
        """Trained on crops smaller than the face (model.crop_size), so ten-crop TTA applies."""
        return 0 < self.crop_size < self.img_size


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    schedule: Literal["cosine", "plateau"] = "cosine"  # after the warmup: cosine decay, or drops on a plateau
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.01  # the lr never falls below lr * min_lr_ratio (cosine ends there)
    plateau_factor: float = 0.5  # plateau: multiply the lr by this ...
    plateau_patience: int = 5  # ... after this many epochs without a better validation accuracy
    label_smoothing: float = 0.1
    class_weights: Literal["none", "balanced"] = "none"  # none | balanced (inverse class frequency)
    sampler: Literal["uniform", "balanced"] = "uniform"  # uniform | balanced (each class equally likely per draw)
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.0  # 0 disables; otherwise the EMA weights are evaluated and saved
    ema_warmup: bool = False  # the EMA's decay at update n is min(ema_decay, (1 + n) / (10 + n))
    # knowledge distillation from teacher run folders or model files (fervit.training.teachers)
    distill_from: tuple[str, ...] = ()
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    # progressive self-distillation (PS-KD): each training image's target mixes its label with the model's own
    # prediction for it in the previous epoch, with a weight rising linearly from 0 to this; 0 disables
    self_distill: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 128
    eval_batch_size: int = 1024
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (checked against DEVICE_PATTERN)
    compile: Literal["auto", "on", "off"] = "auto"  # auto (cuda only) | on | off
    step_mode: Literal["auto", "eager", "compile", "cuda_graph"] = "auto"  # auto: the model compiled as
    #   train.compile says, the step eager; compile / cuda_graph: forward+loss compiled as one graph (cuda_graph:
    #   replayed as CUDA graphs, CUDA only), see fervit.training.step; eager: nothing compiled
    channels_last: Literal["auto", "on", "off"] = "auto"  # conv weights and inputs in NHWC; auto: on a CPU for models
    #                                                       with convolutions (fervit.device.channels_last_choice)
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on cuda and on CPUs with native bf16 | bf16 | off
    early_stop_patience: int = 0  # epochs without a better val accuracy; 0 disables
    time_budget_s: float = 0.0  # >0: from epoch 2 on, cap the epochs to fit this wall time; the cosine re-plans
    tta: Literal["none", "mirror", "ten_crop"] = "none"  # final evaluation: mirror (face + mirror) | ten_crop
    #                                                      (corners + centre, mirrored; needs model.crop_size);
    #                                                      results.json keeps the one-view scores in single_view
    log_test: bool = False  # also score the test split after every epoch (`test_acc` in training_metrics.csv), for
    #                         time-to-accuracy curves only: the epoch is still chosen on validation, nothing on test
    output: str = "runs"
    threads: int = 0  # CPU threads for torch; 0: torch's default (one per core). Beside other busy work use fewer:
    #                   a thread that waits for a busy core stalls every step (docs/cpu-training.md)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return from_dict(cls, d, "")


def from_dict(cls, d: dict, prefix: str = ""):
    """Build the config dataclass `cls` (a section or the whole tree) from JSON, every value checked
    against its declared type; `prefix` names the section in errors (e.g. "model.")."""
    if not isinstance(d, dict):
        raise FervitError(f"config section '{prefix or 'root'}' must be a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise FervitError(f"unknown config key '{prefix}{unknown[0]}'; known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# values older config files hold for a key that has since become a choice of names
LEGACY_VALUES = {"train.tta": {False: "none", True: "mirror", "false": "none", "true": "mirror"},
                 "train.channels_last": {False: "off", True: "on", "false": "off", "true": "on"}}


# Every number with a meaningful range: key -> (low, high, what it says, flags), each bound inclusive unless a
# flag says so. Flags: open_low / open_high / open_both (a bound excluded), pair (two values, the first at most
# the second: a range drawn from), nonempty (a list that needs at least one value). Tuples are checked value by
# value. Beyond these, NaN and infinity are refused for every float key (`_coerce`).
RANGES = {
    "optim.lr": (0.0, None, "above 0", "open_low"),
    "optim.weight_decay": (0.0, None, "0 or more", ""),
    "optim.betas": (0.0, 1.0, "two values in [0, 1)", "open_high"),
    "optim.momentum": (0.0, 1.0, "in [0, 1)", "open_high"),
    "optim.warmup_epochs": (0.0, None, "0 or more", ""),
    "optim.min_lr_ratio": (0.0, 1.0, "in [0, 1]", ""),
    "optim.label_smoothing": (0.0, 1.0, "in [0, 1)", "open_high"),
    "optim.grad_clip": (0.0, None, "0 (off) or more", ""),
    "optim.ema_decay": (0.0, 1.0, "0 (off) or in (0, 1)", "open_high"),
    "optim.plateau_factor": (0.0, 1.0, "in (0, 1): a drop of the lr", "open_both"),
    "optim.plateau_patience": (1, None, "at least 1", ""),
    "optim.distill_weight": (0.0, 1.0, "in [0, 1]", ""),
    "optim.distill_temperature": (0.0, None, "above 0", "open_low"),
    "optim.self_distill": (0.0, 1.0, "0 (off) or in (0, 1): the last epoch's weight of the model's own predictions",
                           "open_high"),
    "train.epochs": (1, None, "at least 1", ""),
    "train.batch_size": (1, None, "at least 1", ""),
    "train.eval_batch_size": (1, None, "at least 1", ""),
    "train.time_budget_s": (0.0, None, "0 (off) or more", ""),
    "train.early_stop_patience": (0, None, "0 (off) or more", ""),
    "train.threads": (0, None, "0 (torch's default) or more", ""),
    "augment.hflip": (0.0, 1.0, "a probability in [0, 1]", ""),
    "augment.rotation": (0.0, 180.0, "in [0, 180] degrees", ""),
    "augment.translate": (0.0, 1.0, "a fraction of the image in [0, 1]", ""),
    "augment.scale": (0.0, 1.0, "two area fractions in (0, 1], the smaller first", "open_low pair"),
    "augment.ratio": (0.0, None, "two aspect ratios above 0, the smaller first", "open_low pair"),
    "augment.brightness": (0.0, 1.0, "in [0, 1] (the factor is drawn from [1-b, 1+b])", ""),
    "augment.contrast": (0.0, 1.0, "in [0, 1] (the factor is drawn from [1-c, 1+c])", ""),
    "augment.erase_p": (0.0, 1.0, "a probability in [0, 1]", ""),
    "augment.erase_scale": (0.0, 1.0, "two area fractions in (0, 1], the smaller first", "open_low pair"),
    "augment.erase_ratio": (0.0, None, "two aspect ratios above 0, the smaller first", "open_low pair"),
    "augment.mix_p": (0.0, 1.0, "a probability in [0, 1]", ""),
    "augment.mixup_alpha": (0.0, None, "0 (off) or more", ""),
    "augment.cutmix_alpha": (0.0, None, "0 (off) or more", ""),
    "augment.low_res": (0, None, "0 (off) or a side in pixels below the one the model trains on", ""),
    "augment.low_res_until": (0.0, 1.0, "a fraction of the planned epochs in (0, 1)", "open_both"),
    "data.val_fraction": (0.0, 1.0, "in (0, 1)", "open_both"),
    # FER-2013's faces are 48x48 grayscale in 7 classes: a model for anything else cannot be trained on them
    "model.img_size": (48, 48, "48, the size of FER-2013's faces (model.crop_size trains on smaller crops)", ""),
    "model.in_chans": (1, 1, "1: FER-2013's faces are grayscale", ""),
    "model.num_classes": (7, 7, "7, the FER-2013 classes", ""),
    "model.patch_size": (1, None, "at least 1", ""),
    "model.embed_dim": (1, None, "at least 1", ""),
    "model.depth": (0, None, "0 or more", ""),
    "model.num_heads": (1, None, "at least 1", ""),
    "model.mlp_dim": (1, None, "at least 1", ""),
    "model.dropout": (0.0, 1.0, "a probability in [0, 1)", "open_high"),
    "model.attn_dropout": (0.0, 1.0, "a probability in [0, 1)", "open_high"),
    "model.drop_path": (0.0, 1.0, "a probability in [0, 1)", "open_high"),
    "model.head_hidden": (0, None, "0 (a single linear head) or more", ""),
    "model.stem_channels": (1, None, "one or more channel counts, each at least 1", "nonempty"),
    "model.stem_convs": (1, None, "at least 1", ""),
    "model.stem_blocks": (1, None, "at least 1", ""),
    "model.crop_size": (0, None, "0 (no crop) or more", ""),
    "model.input_size": (0, None, "0 (img_size) or more", ""),
}


def _range_of(key: str):
    """The RANGES entry of `key` (also when it is prefixed, e.g. a sweep's or a model file's), else None."""
    for suffix, spec in RANGES.items():
        if key == suffix or key.endswith("." + suffix):
            return spec
    return None


def _check_range(value, key: str):
    """A one-line error when a number is outside what its key can mean (see RANGES)."""
    spec = _range_of(key)
    if spec is not None:
        low, high, says, flags = spec
        flags = flags.split()
        open_low, open_high = "open_low" in flags or "open_both" in flags, "open_high" in flags or "open_both" in flags
        too_low = low is not None and (value < low or (value == low and open_low))
        too_high = high is not None and (value > high or (value == high and open_high))
        if too_low or too_high:
            raise FervitError(f"config key '{key}' must be {says}, got {value!r}")
    return value


def _check_tuple(values: tuple, hint, key: str) -> tuple:
    """A one-line error for a tuple of the wrong length, an empty one that needs values, or a pair given the
    wrong way round (see RANGES)."""
    args = typing.get_args(hint)
    spec = _range_of(key)
    flags = spec[3].split() if spec else []
    says = f" ({spec[2]})" if spec else ""
    if Ellipsis not in args and len(values) != len(args):
        raise FervitError(f"config key '{key}' takes {len(args)} values{says}, got {len(values)}: {list(values)}")
    if "nonempty" in flags and not values:
        raise FervitError(f"config key '{key}' must be {spec[2]}, got none")
    if "pair" in flags and values[0] > values[1]:
        raise FervitError(f"config key '{key}' must be {spec[2]}, got {list(values)}")
    return values


def _coerce(value, hint, key: str):
    """Turn a JSON value or a command-line string into the field's declared type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, (str, bool)):
            value = LEGACY_VALUES.get(key, {}).get(value.lower() if isinstance(value, str) else value, value)
        if value not in choices:
            raise FervitError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")
        return value
    if key.endswith("train.device") and not (isinstance(value, str) and DEVICE_PATTERN.fullmatch(value)):
        raise FervitError(f"config key '{key}' must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise FervitError(f"config key '{key}' takes a list of values such as [1, 2], got {value!r}")
        inner = typing.get_args(hint)[0]
        return _check_tuple(tuple(_coerce(v, inner, key) for v in value), hint, key)
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                return low in ("true", "1", "yes", "on")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return _check_range(int(value), key)
        if hint is float:
            number = float(value)
            if not math.isfinite(number):  # NaN passes every comparison, so it would slip through RANGES
                raise FervitError(f"config key '{key}' must be a finite number, got {value!r}")
            return _check_range(number, key)
        return str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int() of an infinite JSON number
        raise FervitError(f"config key '{key}' expects a {hint.__name__}, got {value!r}") from None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` strings (e.g. `model.depth=4`, `optim.lr=1e-3`)."""
    for item in overrides:
        if "=" not in item:
            raise FervitError(f"override '{item}' must look like section.key=value, e.g. model.depth=4")
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2:
            raise FervitError(f"override '{item}' must name a section and a key, e.g. optim.lr=1e-3")
        section_name, key = parts
        section = getattr(cfg, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise FervitError(f"unknown config section '{section_name}'; known: data, augment, model, optim, train")
        hints = typing.get_type_hints(type(section))
        if key not in hints:
            raise FervitError(f"unknown config key '{path}'; known keys in {section_name}: {', '.join(sorted(hints))}")
        setattr(section, key, _coerce(value, hints[key], path))
    return cfg


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fervit.presets").iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: str) -> RunConfig:
    """A preset by name (shipped in fervit/presets) or a path to a JSON file of the same shape."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text()
    else:
        res = resources.files("fervit.presets") / f"{name_or_path}.json"
        if not res.is_file():
            raise FervitError(f"no preset '{name_or_path}'; choose one of {', '.join(preset_names())} or give a .json file")
        text = res.read_text()
    try:
        return RunConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise FervitError(f"preset '{name_or_path}' is not valid JSON: {e}") from None
