"""Checks on a checkpoint before it is trusted: its JSON description, the shapes its file declares, its values.

A crafted or damaged checkpoint ends in one sentence naming the file, before anything large is allocated:
the description is checked first, then the model is built on PyTorch's `meta` device (no memory) and
compared with the tensor shapes in the safetensors header, and only then are the weights read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fervit.config import ModelConfig, _from_dict
from fervit.errors import FervitError

FORMAT = "fervit-model/1"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_description(meta_path: Path, weights: Path) -> tuple[dict, ModelConfig]:
    """The JSON description beside `weights` and its ModelConfig; a one-line error if it is missing, damaged
    or describes something that cannot be these weights."""
    try:
        meta = json.loads(meta_path.read_bytes())
    except FileNotFoundError:
        raise FervitError(f"'{meta_path.name}' is missing beside '{weights}'; it says how to rebuild the model") from None
    except OSError as e:
        raise FervitError(f"cannot read '{meta_path}' ({e.strerror or e})") from None
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for binary files
        raise FervitError(f"'{meta_path}' is damaged (not valid JSON); re-export the checkpoint") from None
    check_description(meta, meta_path)
    cfg = model_config(meta, meta_path)
    check_agreement(meta, cfg, meta_path)
    return meta, cfg


def check_description(meta, meta_path: Path) -> None:
    """A one-line error unless `meta` is a complete fervit model description whose parts agree."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FervitError(f"'{meta_path}' is not a fervit model description (expected format {FORMAT})")
    missing_keys = [k for k in ("model", "classes", "input") if k not in meta]
    if missing_keys:
        raise FervitError(f"'{meta_path}' is an incomplete model description (missing {missing_keys[0]!r}); "
                          "re-export the checkpoint")
    classes, model, size = meta["classes"], meta["model"], meta["input"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise FervitError(f"'{meta_path}': 'classes' must be a list of class names")
    if not isinstance(model, dict) or not isinstance(size, dict):
        raise FervitError(f"'{meta_path}': 'model' and 'input' must be JSON objects")


def check_agreement(meta: dict, cfg: ModelConfig, meta_path: Path) -> None:
    """A one-line error unless the class names and input size agree with the model that will be built."""
    if len(meta["classes"]) != cfg.num_classes:
        raise FervitError(f"'{meta_path}' names {len(meta['classes'])} classes but its model has {cfg.num_classes} "
                          "outputs; the two must agree")
    size = meta["input"].get("size", cfg.img_size)
    if size != cfg.img_size:
        raise FervitError(f"'{meta_path}' says the input is {size} px but its model is built for "
                          f"{cfg.img_size} px images; the two must agree")


def model_config(meta: dict, meta_path: Path) -> ModelConfig:
    """`meta["model"]` as a ModelConfig whose sizes are all positive."""
    try:
        cfg = _from_dict(ModelConfig, meta["model"], "model.")
    except FervitError as e:
        raise FervitError(f"'{meta_path}' describes no model fervit can build ({e})") from None
    except (TypeError, ValueError) as e:
        raise FervitError(f"'{meta_path}' describes no model fervit can build ({e})") from None
    sizes = {"img_size": cfg.img_size, "in_chans": cfg.in_chans, "num_classes": cfg.num_classes,
             "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_dim": cfg.mlp_dim,
             "patch_size": cfg.patch_size, "stem_convs": cfg.stem_convs}
    bad = next((k for k, v in sizes.items() if v < 1), None)
    if bad:
        raise FervitError(f"'{meta_path}': model.{bad} must be at least 1, got {sizes[bad]}")
    if cfg.name == "vit_cnn" and (not cfg.stem_channels or min(cfg.stem_channels) < 1):
        raise FervitError(f"'{meta_path}': model.stem_channels must list at least one positive channel count, "
                          f"got {list(cfg.stem_channels)}")
    return cfg


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
    blocks = cfg.depth + len(cfg.stem_channels) * cfg.stem_convs
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
    missing = sorted(set(expected) - set(declared))
    unexpected = sorted(set(declared) - set(expected))
    bad_shape = [k for k in expected if k in declared and declared[k][0] != tuple(expected[k].shape)]
    bad_type = [k for k in expected if k in declared and expected[k].is_floating_point()
                and declared[k][1] not in SAFETENSORS_DTYPES]
    if missing or unexpected or bad_shape:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape of {bad_shape[0]} is {declared[bad_shape[0]][0]}, "
                       f"expected {tuple(expected[bad_shape[0]].shape)}")
        raise FervitError(f"checkpoint '{weights}' does not match a {cfg.name} model as described in "
                          f"'{meta_path.name}' ({detail})")
    if bad_type:
        raise FervitError(f"checkpoint '{weights}' stores {bad_type[0]} as {declared[bad_type[0]][1]}; a model's "
                          "weights are floating point (F32, F16 or BF16)")


def check_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A one-line error if any floating-point tensor holds NaN or infinity (a diverged or damaged model)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FervitError(f"checkpoint '{path}' holds NaN or infinite values in {name}; the model diverged "
                              "or the file is damaged, so it is refused")
