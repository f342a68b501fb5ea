"""Progressive resizing (`augment.low_res`): the first part of a run trains on smaller images, the rest on the
model's own side.

An image's cost is about its pixel count, so 32 px crops instead of 40 cost 0.64 of an epoch, and a time budget
fits more epochs; the epochs at full size at the end are what the model is evaluated at. The split follows the
planned epochs (`augment.low_res_until` of them), so a plan the time budget shortens moves it with the cosine.
"""

from __future__ import annotations

import torch

from fervit.config import RunConfig
from fervit.errors import FervitError
from fervit.models import build_model


def full_side(cfg: RunConfig) -> int:
    """The side the model is trained and evaluated at: its crop, else the whole face."""
    return cfg.model.trained_side()


def low_res_epochs(cfg: RunConfig, epochs: int) -> int:
    """How many of `epochs` planned epochs train at augment.low_res (0 when it is off)."""
    return int(cfg.augment.low_res_until * epochs) if cfg.augment.low_res else 0


def training_side(cfg: RunConfig, epoch: int, epochs: int) -> int:
    """The side epoch `epoch` (1-based) of `epochs` trains at."""
    return cfg.augment.low_res if epoch <= low_res_epochs(cfg, epochs) else full_side(cfg)


def epoch_cost(cfg: RunConfig, epoch: int, epochs: int) -> float:
    """Epoch `epoch`'s cost as a share of an epoch at full size, by pixel count."""
    return (training_side(cfg, epoch, epochs) / full_side(cfg)) ** 2


def describe_low_res(cfg: RunConfig, epochs: int) -> str:
    """The log line that says what progressive resizing does in this plan."""
    k = low_res_epochs(cfg, epochs)
    return (f"progressive resizing: epochs 1-{k} of {epochs} train on {cfg.augment.low_res}px images, the rest on "
            f"{full_side(cfg)}px (augment.low_res)")


def check_low_res(cfg: RunConfig) -> None:
    """One-line errors, before any data is read, for a low_res the model cannot train at."""
    low = cfg.augment.low_res
    if not low:
        return
    if not cfg.augment.enabled:
        raise FervitError("augment.low_res samples the augmented images smaller, and augment.enabled is off; turn "
                          "augmentation on or set augment.low_res=0")
    if low >= full_side(cfg):
        raise FervitError(f"augment.low_res must be below the {full_side(cfg)}px side the model trains on "
                          f"(model.crop_size or img_size), got {low}")
    try:
        with torch.device("meta"):  # shapes only: no memory, no weights
            build_model(cfg.model)(torch.zeros(2, cfg.model.in_chans, low, low))
    except Exception as e:  # the model's own words on why that side does not fit it
        raise FervitError(f"{cfg.model.name} cannot train on {low}px images (augment.low_res): {e}") from None


def set_epoch_side(step, cfg: RunConfig, epoch: int, epochs: int, log) -> None:
    """Before epoch `epoch`: give the TrainStep `step` the side it trains at, and say so when that changes (at the
    first epoch trained, a resume's too, and at the switch to full size)."""
    side = training_side(cfg, epoch, epochs)
    if cfg.augment.low_res and side != (step.side or full_side(cfg)):
        log(describe_low_res(cfg, epochs) if side == cfg.augment.low_res else
            f"progressive resizing: from epoch {epoch} on, {side}px images (augment.low_res)")
    step.side = side
