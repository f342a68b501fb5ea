"""What a resumed run must keep to continue exactly: its recipe (the config less where/how-fast keys), its
data, its number of processes and its kind of device."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from fervit.config import RunConfig
from fervit.errors import FervitError
from fervit.run_folder import has_results
from fervit.training.distributed import DistContext

# config keys that say where, how fast or how long to run, not what to compute: a resumed run may change them
# (train.epochs extends or re-plans the run: the trainer's `extend`)
FREE_KEYS = frozenset({"data.root", "data.cache_dir", "data.strict", "train.output", "train.threads",
                       "train.channels_last", "train.device", "train.compile", "train.eval_batch_size", "train.epochs"})


def recipe(cfg_dict: dict) -> dict:
    """The config without FREE_KEYS: what must be identical for a resume to be exact."""
    return {section: {k: v for k, v in values.items() if f"{section}.{k}" not in FREE_KEYS}
            for section, values in cfg_dict.items()}


def recipe_hash(cfg: RunConfig) -> str:
    text = json.dumps(recipe(cfg.to_dict()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_config(saved: dict, cfg: RunConfig, run_dir: Path) -> None:
    """Raise a one-line FervitError naming the first recipe key that differs from the checkpoint's config
    (train.epochs may differ: that extends or re-plans the run)."""
    with contextlib.suppress(FervitError):  # keys added to the config since then take their (old-behaviour) defaults
        saved = RunConfig.from_dict(saved).to_dict()
    saved_recipe = json.loads(json.dumps(recipe(saved)))
    new_recipe = json.loads(json.dumps(recipe(cfg.to_dict())))
    for section in sorted(set(saved_recipe) | set(new_recipe)):
        old, new = saved_recipe.get(section, {}), new_recipe.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise FervitError(f"'{section}.{key}' is {new.get(key)!r} but {run_dir} was trained with "
                                  f"{old.get(key)!r}; a resumed run keeps its recipe (only "
                                  f"{', '.join(sorted(FREE_KEYS))} may change)")


def data_fingerprint(labels: torch.Tensor, splits) -> str:
    """A short hash of the labels and the split indices: a resumed run must see the same examples."""
    h = hashlib.blake2b(digest_size=12)
    for t in (labels, splits.train, splits.val, splits.test):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def check_continuable(state, cfg: RunConfig, ctx: DistContext, fingerprint: str, run_dir: Path) -> None:
    """One-line errors for a checkpoint (a checkpoint.ResumeState) that this process cannot continue exactly;
    its recipe is `check_config`'s, checked before the data is read."""
    done, planned, p = state.epoch, state.planned_epochs, state.progress
    if cfg.train.epochs != planned:  # --epochs N: the trainer's `extend` re-plans the run to N epochs
        if cfg.train.epochs <= done:
            raise FervitError(f"--epochs {cfg.train.epochs}: {run_dir} has trained {done} epochs already; give more "
                              f"than {done} to train it further")
    elif has_results(run_dir) and (done >= p["epochs"] or p["stop_reason"]):
        how = f"{p['stop_reason']} after {done} epochs" if p["stop_reason"] else f"{done} epochs"
        raise FervitError(f"{run_dir} has already finished ({how}; results.json is written); to train it further, "
                          f"give --epochs N with N above {max(done, planned)}")
    if state.meta["world_size"] != ctx.world_size:
        raise FervitError(f"{run_dir} was trained by {state.meta['world_size']} process(es) and this is "
                          f"{ctx.world_size}; resume with the same number (e.g. torchrun --nproc-per-node "
                          f"{state.meta['world_size']}) so every rank gets its RNG state back")
    if state.meta["device_type"] != ctx.device.type:
        raise FervitError(f"{run_dir} was trained on {state.meta['device_type']} and this process uses "
                          f"{ctx.device.type}; resume with --device {state.meta['device_type']}")
    if state.meta["data_fingerprint"] != fingerprint:
        raise FervitError(f"the data at '{cfg.data.root}' is not the data {run_dir} was trained on (other "
                          "images, labels or splits); point --data at the original dataset")
