"""Builders that several test files share: tiny models, their model files, and tiny run configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fervit.config import ModelConfig, RunConfig, apply_overrides, load_preset
from fervit.models import build_model
from fervit.models.checkpoint import describe, save_model

# a vit_cnn (or vit_patch) small enough to build, train and export in well under a second
TINY_MODEL = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, stem_channels=(8, 16), head_hidden=32)


def tiny_model_config(name: str = "vit_cnn", **overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig(name=name), **{**TINY_MODEL, **overrides})


def tiny_model(name: str = "vit_cnn", seed: int = 0, **overrides) -> torch.nn.Module:
    """An untrained tiny model, the same weights for the same seed."""
    torch.manual_seed(seed)
    return build_model(tiny_model_config(name, **overrides))


def save_tiny_checkpoint(run_dir: Path, name: str = "vit_cnn", seed: int = 0, **overrides) -> Path:
    """An untrained tiny model saved as a run folder holds its best model; returns the weights file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_model(name, seed, **overrides)
    return save_model(model, describe(tiny_model_config(name, **overrides)), run_dir / "best_model.safetensors")


def tiny_run_config(*overrides: str, root: Path | None = None, output: Path | None = None) -> RunConfig:
    """The `tiny` preset on the CPU with one thread, reading `root` and writing runs under `output`."""
    where = [f"data.root={root}", f"data.cache_dir={root.parent / 'cache'}"] if root is not None else []
    if output is not None:
        where.append(f"train.output={output}")
    return apply_overrides(load_preset("tiny"), ["train.device=cpu", "train.threads=1", *where, *overrides])


def signal_at_step(monkeypatch, step_no: int) -> None:
    """Raise SIGUSR1 inside training step `step_no` (counted from 1), as a preemption would, through the step's
    augmentation; `monkeypatch.undo()` takes it away again."""
    import signal

    import fervit.training.step as step_module

    calls = {"n": 0}
    augment = step_module.augment_batch

    def augment_and_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step_no:
            signal.raise_signal(signal.SIGUSR1)
        return augment(*args, **kwargs)

    monkeypatch.setattr(step_module, "augment_batch", augment_and_signal)
