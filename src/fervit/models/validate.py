"""Checks on a model file before it is trusted: its JSON description, the shapes its file declares, its values.

A crafted or damaged checkpoint ends in one sentence naming the file, before anything large is allocated:
the description is checked first, then the model is built on PyTorch's `meta` device (no memory) and
compared with the tensor shapes in the safetensors header, and only then are the weights read.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fervit.config import ModelConfig
from fervit.errors import FervitError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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


def header_tensors(weights: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) from the file's header, without reading any weights."""
    try:
        with safe_open(weights, framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise FervitError(f"checkpoint '{weights}' is damaged or not a safetensors file ({e})") from None


def check_shapes(cfg: ModelConfig, weights: Path, meta_path: Path) -> None:
    """Build the described model on the `meta` device (no memory) and compare it with the file's header,
    so a description that would need gigabytes is refused before anything is allocated."""
    from fervit.models import build_model

    declared = header_tensors(weights)
    per_stage = cfg.stem_blocks if cfg.name == "vit_resnet" else cfg.stem_convs
    blocks = cfg.depth + len(cfg.stem_channels) * per_stage
    if blocks > len(declared):  # each block holds tensors: more blocks than tensors cannot be these weights
        raise FervitError(f"checkpoint '{weights}' holds {len(declared)} tensors, too few for the "
                          f"depth-{cfg.depth} {cfg.name} described in '{meta_path.name}'")
    try:
        with torch.device("meta"):
            expected = build_model(cfg).state_dict()
    except FervitError:
        raise
    except Exception as e:  # a description the model code rejects in its own words
        if cfg.name == "timm":  # some timm models call .item() while building, which the meta device refuses;
            return  # their shapes come from the backbone's name, and load_model compares them after building
        raise FervitError(f"cannot build the {cfg.name} described in '{meta_path}' ({e})") from None
    check_match({k: tuple(v.shape) for k, v in expected.items()}, {k: shape for k, (shape, _) in declared.items()},
                cfg.name, weights, meta_path)
    bad_type = [k for k in expected if k in declared and expected[k].is_floating_point()
                and declared[k][1] not in SAFETENSORS_DTYPES]
    if bad_type:
        raise FervitError(f"checkpoint '{weights}' stores {bad_type[0]} as {declared[bad_type[0]][1]}; a model's "
                          "weights are floating point (F32, F16 or BF16)")


def check_match(expected: dict[str, tuple], found: dict[str, tuple], name: str, weights: Path,
                meta_path: Path) -> None:
    """A one-line error unless the tensor names and shapes `found` in a file are those the model `expected`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    bad_shape = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or bad_shape:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape of {bad_shape[0]} is {tuple(found[bad_shape[0]])}, expected {tuple(expected[bad_shape[0]])}")
        raise FervitError(f"checkpoint '{weights}' does not match a {name} model as described in "
                          f"'{meta_path.name}' ({detail})")


def check_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A one-line error if any floating-point tensor holds NaN or infinity (a diverged or damaged model)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FervitError(f"checkpoint '{path}' holds NaN or infinite values in {name}; the model diverged "
                              "or the file is damaged, so it is refused")
