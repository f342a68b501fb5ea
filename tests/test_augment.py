"""The device-side augmentation computes what the per-image pipeline would, per sample, within its ranges."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fervit.config import AugmentConfig
from fervit.data.augment import affine_grid, affine_params, augment_batch, erase_mask, mix_batch
from fervit.data.images import normalize
from fervit.evaluation.evaluate import predict_logits

# every op switched off but the pipeline enabled: the identity, so each test can turn on one op
NOTHING = AugmentConfig(hflip=0.0, rotation=0.0, translate=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                        brightness=0.0, contrast=0.0, erase_p=0.0)


def only(**changes) -> AugmentConfig:
    return dataclasses.replace(NOTHING, **changes)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ramp_images(n: int, low: int = 0, high: int = 255) -> torch.Tensor:
    """(n, 48, 48) uint8 with a horizontal ramp: left-right asymmetric, so a flip is visible."""
    row = torch.linspace(low, high, 48).round().to(torch.uint8)
    return row.expand(n, 48, 48).clone()


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: (B, 1, H, W) in [-1, 1] -> (B, H, W) in [0, 255]."""
    return (x[:, 0] * 0.5 + 0.5) * 255


def test_identity_config_returns_the_eval_transform_exactly():
    images = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)
    out = augment_batch(images, NOTHING, gen())
    torch.testing.assert_close(out, normalize(images), atol=1e-5, rtol=0)


def test_disabled_augmentation_is_the_eval_transform():
    images = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)
    assert torch.equal(augment_batch(images, AugmentConfig(enabled=False), gen()), normalize(images))


def test_augmentation_does_not_modify_the_resident_uint8_images():
    images = torch.randint(0, 256, (32, 48, 48), dtype=torch.uint8)
    before = images.clone()
    augment_batch(images, AugmentConfig(), gen())
    assert torch.equal(images, before)


def test_sampling_grid_equals_torchs_affine_grid():
    mat = affine_params(AugmentConfig(rotation=30.0), 64, gen(), "cpu")
    expected = F.affine_grid(mat, [64, 1, 48, 40], align_corners=False)
    torch.testing.assert_close(affine_grid(mat, 48, 40), expected, atol=1e-6, rtol=0)


def test_certain_flip_is_an_exact_mirror():
    images = torch.randint(0, 256, (8, 48, 48), dtype=torch.uint8)
    out = augment_batch(images, only(hflip=1.0), gen())
    torch.testing.assert_close(out, normalize(images).flip(-1), atol=1e-5, rtol=0)


def test_labels_stay_aligned_with_their_images_through_indexing_and_augmentation():
    # each image is one flat grey level that names its sample; geometry and padding only blend it with
    # black, so the brightest pixel that was not erased (erased = exactly 0 after normalising) names it
    n = 200
    values = torch.arange(30, 30 + n, dtype=torch.uint8)
    images = values.view(n, 1, 1).expand(n, 48, 48).clone()
    labels = torch.arange(n)
    cfg = dataclasses.replace(AugmentConfig(), brightness=0.0, contrast=0.0, erase_p=1.0)
    order = torch.randperm(n, generator=gen(1))
    for start in range(0, n, 64):  # the trainer's pattern: index images and labels with the same slice
        idx = order[start:start + 64]
        x, y = augment_batch(images[idx], cfg, gen(start)), labels[idx]
        kept = to_pixels(x.masked_fill(x == 0.0, -1.0))
        brightest = kept.amax(dim=(1, 2)).round().long()
        assert torch.equal(brightest, values[y].long())


def test_randomness_is_per_sample_not_per_batch():
    images = ramp_images(256)
    out = augment_batch(images, AugmentConfig(), gen())
    flat = out.flatten(1)
    distinct = torch.unique(flat, dim=0)
    assert len(distinct) == len(images)  # a per-batch draw would give one image 256 times


def test_flip_probability_is_drawn_per_sample():
    images = ramp_images(2000)
    out = to_pixels(augment_batch(images, only(hflip=0.5), gen()))
    flipped = out[:, :, 0] > out[:, :, -1]  # the ramp rises left to right unless mirrored
    assert 0.45 < flipped.float().mean() < 0.55


def test_affine_parameters_stay_within_their_ranges():
    cfg = AugmentConfig(rotation=15.0, translate=0.1, scale=(0.6, 0.9), ratio=(0.75, 1.3333), hflip=0.5)
    mat = affine_params(cfg, 20000, gen(), "cpu")  # (n, 2, 3): input = A @ output + t
    a = mat[:, :, :2]
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    area = det.abs()  # the crop's area fraction: rotation and flip keep areas
    assert area.min() >= cfg.scale[0] - 1e-4 and area.max() <= cfg.scale[1] + 1e-4
    assert area.min() < cfg.scale[0] + 0.02 and area.max() > cfg.scale[1] - 0.02  # the whole range is used
    flip = det < 0
    assert 0.48 < flip.float().mean() < 0.52
    # undo the flip, then the rotation angle is atan2 of the second column
    angle = torch.rad2deg(torch.atan2(-a[:, 0, 1], a[:, 1, 1]))
    assert angle.abs().max() <= cfg.rotation + 1e-3 and angle.abs().max() > cfg.rotation - 0.5
    # the centre shift is crop offset (inside the image) plus translation (2 * 0.1 of [-1, 1] space)
    half_extent = torch.stack([a[:, :, 0].norm(dim=1), a[:, :, 1].norm(dim=1)], dim=1)  # (w, h)
    slack = mat[:, :, 2].abs() - (1 - half_extent) - 2 * cfg.translate
    assert slack.max() <= 1e-4


def test_brightness_factor_is_per_sample_and_in_range():
    images = torch.full((4000, 48, 48), 100, dtype=torch.uint8)
    out = to_pixels(augment_batch(images, only(brightness=0.3), gen()))
    factor = out.mean(dim=(1, 2)) / 100
    assert factor.min() >= 0.7 - 1e-3 and factor.max() <= 1.3 + 1e-3
    assert factor.min() < 0.72 and factor.max() > 1.28
    torch.testing.assert_close(out.std(dim=(1, 2)), torch.zeros(len(out)), atol=1e-3, rtol=0)  # one factor per image


def test_contrast_keeps_each_image_mean_and_scales_its_spread_in_range():
    images = ramp_images(4000, 64, 192)  # leaves room for a 1.4x spread without clipping
    base = to_pixels(normalize(images[:1]))[0]
    out = to_pixels(augment_batch(images, only(contrast=0.4), gen()))
    torch.testing.assert_close(out.mean(dim=(1, 2)), base.mean().expand(len(out)), atol=0.05, rtol=0)
    factor = out.std(dim=(1, 2)) / base.std()
    assert factor.min() >= 0.6 - 1e-3 and factor.max() <= 1.4 + 1e-3
    assert factor.min() < 0.62 and factor.max() > 1.38


def test_photometric_output_stays_in_the_normalised_range():
    images = torch.randint(0, 256, (512, 48, 48), dtype=torch.uint8)
    out = augment_batch(images, dataclasses.replace(AugmentConfig(), brightness=0.9, contrast=0.9), gen())
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_erasing_hits_the_asked_fraction_of_samples_with_rectangles_of_the_asked_area():
    cfg = only(erase_p=0.25, erase_scale=(0.02, 0.2), erase_ratio=(0.3, 3.3))
    mask = erase_mask(cfg, 8000, 48, gen(), "cpu")[:, 0]  # (n, 48, 48)
    area = mask.float().mean(dim=(1, 2))
    hit = area > 0
    assert 0.23 < hit.float().mean() < 0.27
    # rounding the sides to whole pixels moves the area a little around the asked range
    assert area[hit].min() >= 0.02 * 0.7 and area[hit].max() <= 0.2 * 1.3
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    is_rectangle = mask.sum(dim=(1, 2)) == rows.sum(1) * cols.sum(1)
    assert bool(is_rectangle.all())


def test_erased_pixels_are_zero_after_normalisation():
    images = torch.full((2000, 48, 48), 200, dtype=torch.uint8)
    out = augment_batch(images, only(erase_p=1.0), gen())
    erased = out == 0.0
    assert bool(erased.flatten(1).any(1).all())  # every sample got a rectangle


class Spy(nn.Module):
    """Records every input batch it sees; answers with a fixed function of it."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.head = nn.Linear(48 * 48, 7)

    def forward(self, x):
        self.seen.append(x.clone())
        return self.head(x.flatten(1))


def test_evaluation_batches_are_only_normalised_and_deterministic():
    images = torch.randint(0, 256, (100, 48, 48), dtype=torch.uint8)
    idx = torch.randperm(100)[:70]
    spy = Spy()
    first = predict_logits(spy, images, idx, batch_size=32)
    second = predict_logits(spy, images, idx, batch_size=32)
    assert torch.equal(first, second)
    seen = torch.cat(spy.seen[:3])
    assert torch.equal(seen, normalize(images[idx]))
    assert math.isclose(float(seen.min()), -1.0, abs_tol=0.01) and math.isclose(float(seen.max()), 1.0, abs_tol=0.01)


def labelled_by_value(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n constant images whose pixel value is their label: a mix shows in both the same way."""
    y = torch.arange(n)
    return y.float().view(n, 1, 1, 1).expand(n, 1, 48, 48).clone(), y


@pytest.mark.parametrize("mode", [dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0)])
def test_mixing_mixes_images_and_targets_in_the_same_proportion(mode):
    x, y = labelled_by_value(6)
    torch.manual_seed(0)
    mixed, target = mix_batch(x, y, AugmentConfig(**mode), 6, torch.Generator().manual_seed(1))
    assert target.sum(1).tolist() == pytest.approx([1.0] * 6)
    assert not torch.equal(mixed, x)
    # each image's mean pixel is the label its soft target expects
    assert mixed.mean(dim=(1, 2, 3)).tolist() == pytest.approx((target * y.float()).sum(1).tolist(), abs=1e-5)


def test_mix_probability_zero_leaves_the_batch_and_gives_one_hot_targets():
    x, y = labelled_by_value(4)
    mixed, target = mix_batch(x, y, AugmentConfig(mixup_alpha=0.4, mix_p=0.0), 4, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, x) and torch.equal(target, torch.eye(4))
