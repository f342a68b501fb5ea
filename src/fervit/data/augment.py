"""Batched augmentation on the training device: per-sample randomness, no per-image Python.

Flip, rotation, translation and random resized crop compose into one affine matrix per sample,
so the whole geometric part is a single `grid_sample`; jitter and erasing are masked tensor math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fervit.config import AugmentConfig
from fervit.data.images import MEAN, STD


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def affine_params(cfg: AugmentConfig, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """Per-sample (n, 2, 3) matrices mapping output to input coordinates in [-1, 1] space."""
    # random resized crop: keep an area fraction s with aspect ratio r -> half-extents (w, h) <= 1
    s = _uniform(n, cfg.scale[0], cfg.scale[1], gen, device)
    log_r = _uniform(n, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), gen, device)
    r = torch.exp(log_r)
    w = torch.sqrt(s * r).clamp(max=1.0)
    h = torch.sqrt(s / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen, device=device) * 2 - 1) * (1 - h)
    # translation as a fraction of the image; [-1, 1] spans 2 units, hence the factor 2
    tx = _uniform(n, -cfg.translate, cfg.translate, gen, device) * 2
    ty = _uniform(n, -cfg.translate, cfg.translate, gen, device) * 2
    theta = _uniform(n, -cfg.rotation, cfg.rotation, gen, device) * (math.pi / 180)
    flip = torch.where(torch.rand(n, generator=gen, device=device) < cfg.hflip, -1.0, 1.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # input = R @ diag(w * flip, h) @ output + (cx + tx, cy + ty)
    mat = torch.stack([
        torch.stack([cos * w * flip, -sin * h, cx + tx], dim=-1),
        torch.stack([sin * w * flip, cos * h, cy + ty], dim=-1),
    ], dim=1)
    return mat


def affine_grid(mat: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 2, 3) matrices -> (n, H, W, 2) sampling grid, equal to `F.affine_grid(..., align_corners=False)`.

    One GEMM of the (H*W, 3) pixel-centre coordinates with all 2n matrix rows: on CPU, F.affine_grid's
    batched matmul with an inner size of 3 costs several times the grid_sample that follows it.
    """
    opts = {"device": mat.device, "dtype": mat.dtype}
    xs = (torch.arange(width, **opts) * 2 + 1) / width - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(height, **opts) * 2 + 1) / height - 1
    base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width, **opts)], dim=-1).view(height * width, 3)
    grid = base @ mat.reshape(-1, 3).T  # (H*W, n*2)
    return grid.view(height, width, -1, 2).permute(2, 0, 1, 3)  # (n, H, W, 2), a view: no copy


def erase_mask(cfg: AugmentConfig, n: int, size: int, gen: torch.Generator, device) -> torch.Tensor:
    """(n, 1, size, size) bool: one random rectangle per selected sample (torchvision's RandomErasing)."""
    area = _uniform(n, cfg.erase_scale[0], cfg.erase_scale[1], gen, device) * size * size
    ratio = torch.exp(_uniform(n, math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1]), gen, device))
    eh = torch.sqrt(area * ratio).round().clamp(1, size)
    ew = torch.sqrt(area / ratio).round().clamp(1, size)
    y0 = (torch.rand(n, generator=gen, device=device) * (size - eh + 1)).floor()
    x0 = (torch.rand(n, generator=gen, device=device) * (size - ew + 1)).floor()
    on = torch.rand(n, generator=gen, device=device) < cfg.erase_p
    pos = torch.arange(size, device=device, dtype=torch.float32)
    rows = (pos[None, :] >= y0[:, None]) & (pos[None, :] < (y0 + eh)[:, None])  # (n, size)
    cols = (pos[None, :] >= x0[:, None]) & (pos[None, :] < (x0 + ew)[:, None])
    return (rows[:, :, None] & cols[:, None, :] & on[:, None, None]).unsqueeze(1)


def random_crop(mat: torch.Tensor, crop: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Compose a random crop x crop window (at the input's pixel scale) onto (n, 2, 3) output->input matrices.

    A crop coordinate u in [-1, 1] lies at v = k*u + o in the augmented image (k = crop/size, |o| <= 1 - k),
    so the composed matrix is [k*L | L@o + t]: still one grid_sample, now of crop x crop pixels. The window
    starts on a whole pixel (as torchvision's RandomCrop), so without other augmentation it copies pixels exactly.
    """
    n, k = mat.shape[0], crop / size
    start = torch.randint(0, size - crop + 1, (n, 2), generator=gen, device=mat.device).to(mat.dtype)
    offset = (2 * start - (size - crop)) / size  # the window's centre, in [-1, 1] units (one pixel = 2/size)
    linear, shift = mat[:, :, :2], mat[:, :, 2]
    return torch.cat([linear * k, (shift + (linear @ offset.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)], dim=2)


def augment_batch(images_u8: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
                  crop_size: int = 0, out_side: int = 0) -> torch.Tensor:
    """(B, H, W) uint8 on any device -> (B, 1, H, W) float32 normalised, augmented per sample.

    `crop_size` (0 < crop_size < H): every sample is also a random crop_size x crop_size window, so the
    result is (B, 1, crop_size, crop_size). With augmentation off the whole face comes back, and a cropping
    model takes its centre. `out_side` (0 < out_side < the window): the window is sampled on an out_side grid
    instead, a smaller image of the same view in the same one grid_sample (progressive resizing,
    `augment.low_res`).
    """
    x = images_u8.unsqueeze(1).float() / 255.0
    if not cfg.enabled:
        return (x - MEAN) / STD
    n, _, size, _ = x.shape
    device = x.device
    mat = affine_params(cfg, n, gen, device)
    out = size
    if 0 < crop_size < size:
        mat, out = random_crop(mat, crop_size, size, gen), crop_size
    if 0 < out_side < out:
        out = out_side
    grid = affine_grid(mat, out, out)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    size = out
    b = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, gen, device).view(n, 1, 1, 1)
    c = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, gen, device).view(n, 1, 1, 1)
    x = x * b
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0.0, 1.0)
    x = (x - MEAN) / STD
    if cfg.erase_p > 0:
        x = x.masked_fill(erase_mask(cfg, n, size, gen, device), 0.0)
    return x


def mix_batch(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, num_classes: int, gen: torch.Generator):
    """Mixup or CutMix on a batch: returns images and soft targets (B, num_classes)."""
    target = F.one_hot(y, num_classes).float()
    use_mixup, use_cutmix = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or float(torch.rand(1, generator=gen, device=x.device)) > cfg.mix_p:
        return x, target
    perm = torch.randperm(len(x), generator=gen, device=x.device)
    pick_cutmix = use_cutmix and (not use_mixup or float(torch.rand(1, generator=gen, device=x.device)) < 0.5)
    alpha = cfg.cutmix_alpha if pick_cutmix else cfg.mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if pick_cutmix:
        size = x.shape[-1]
        cut = int(size * math.sqrt(1 - lam))
        cy, cx = (int(v) for v in torch.randint(0, size, (2,), generator=gen, device=x.device))
        y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2, size)
        x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2, size)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (size * size)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * target + (1 - lam) * target[perm]
