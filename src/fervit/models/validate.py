"""Checks on a model file's weights before they are trusted: the shapes its file declares, then its values.

A crafted or damaged checkpoint ends in one sentence naming the file, before anything large is allocated:
the description is checked first (`fervit.model_file`), then the model is built on PyTorch's `meta` device (no
memory) and compared with the tensor shapes in the safetensors header, and only then are the weights read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fervit.config import ModelConfig
from fervit.errors import FervitError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
