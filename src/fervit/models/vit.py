"""The two model families: a patch ViT (`vit_patch`) and the CNN stem + ViT (`vit_cnn`).

Both share `Encoder`: [CLS] + learnable positions -> pre-norm blocks -> norm -> MLP head on [CLS]
(or on the mean of the other tokens: `model.pool=mean`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fervit.config import ModelConfig
from fervit.models.layers import Block, Dropout, center_crop, init_weights, is_meta
from fervit.models.registry import register_model


class Encoder(nn.Module):
    """Token sequence (B, T, C) -> class logits (B, num_classes), read off the [CLS] token (or, with
    `pool=mean`, the average of the other tokens)."""

    def __init__(self, cfg: ModelConfig, num_tokens: int):
        super().__init__()
        if cfg.pool not in ("cls", "mean"):
            raise ValueError(f"model.pool must be cls or mean, not {cfg.pool!r}")
        self.pool = cfg.pool
        dim = cfg.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + 1, dim))
        self.pos_drop = Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear stochastic depth
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_dim, cfg.dropout, cfg.attn_dropout, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        if cfg.head_hidden:
            self.head = nn.Sequential(nn.Linear(dim, cfg.head_hidden), nn.GELU(), Dropout(cfg.dropout),
                                      nn.Linear(cfg.head_hidden, cfg.num_classes))
        else:
            self.head = nn.Linear(dim, cfg.num_classes)
        if not is_meta(self):  # see init_weights
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Learned tokens and positions: decaying them towards zero only blurs the sequence."""
        return {"cls_token", "pos_embed"}

    def positions(self, n_tokens: int) -> torch.Tensor:
        """The learned positions for n_tokens tokens: as learned, or for a smaller square grid (progressive
        resizing trains on smaller images first) the grid's positions resampled to it, bilinearly."""
        if n_tokens + 1 == self.pos_embed.shape[1]:
            return self.pos_embed
        old, new = math.isqrt(self.pos_embed.shape[1] - 1), math.isqrt(n_tokens)
        if old * old != self.pos_embed.shape[1] - 1 or new * new != n_tokens:
            raise ValueError(f"{n_tokens} tokens are not a square grid of the {self.pos_embed.shape[1] - 1} the "
                             "positions were made for")
        grid = self.pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, n_tokens, -1)], dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, 1 + T, C)
        x = self.pos_drop(x + self.positions(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        if self.pool == "mean":
            return self.head(self.norm(x[:, 1:]).mean(dim=1))
        return self.head(self.norm(x[:, 0]))


class VisionTransformerEmotion(nn.Module):
    """Patch ViT: non-overlapping patch_size x patch_size patches embedded by a strided conv."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_size = cfg.trained_side()
        if self.input_size % cfg.patch_size:
            raise ValueError(f"input size {self.input_size} is not divisible by patch_size {cfg.patch_size}")
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.num_tokens = (self.input_size // cfg.patch_size) ** 2
        self.encoder = Encoder(cfg, self.num_tokens)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(center_crop(x, self.input_size))  # (B, C, H/p, W/p)
        return self.encoder(x.flatten(2).transpose(1, 2))  # tokens (B, T, C)


def conv_stem(in_chans: int, channels: tuple[int, ...], convs_per_stage: int, pool_last: bool = True) -> nn.Sequential:
    """Stages of [3x3 conv + BN + ReLU] x convs_per_stage, each closed by a 2x2 max-pool (the last one too
    unless `pool_last` is False: then the last stage's full-resolution map becomes the tokens)."""
    layers, prev = [], in_chans
    for i, ch in enumerate(channels):
        for _ in range(convs_per_stage):
            layers += [nn.Conv2d(prev, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            prev = ch
        if pool_last or i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class VisionTransformerEmotionCNN(nn.Module):
    """CNN stem -> feature map tokens -> linear projection -> ViT encoder.

    With the default stem (32, 64 channels, one conv each) a 48x48 face becomes 64x12x12: 144 tokens.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.stem = conv_stem(cfg.in_chans, cfg.stem_channels, cfg.stem_convs)
        self.input_size = cfg.trained_side()
        side = self.input_size // 2 ** len(cfg.stem_channels)
        if side < 1:
            raise ValueError(f"{len(cfg.stem_channels)} stem stages shrink a {self.input_size}px image to nothing")
        self.num_tokens = side * side
        self.proj = nn.Linear(cfg.stem_channels[-1], cfg.embed_dim)
        self.encoder = Encoder(cfg, self.num_tokens)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(center_crop(x, self.input_size))  # (B, 64, 12, 12)
        return self.encoder(self.proj(x.flatten(2).transpose(1, 2)))  # tokens (B, 144, 192)


@register_model("vit_patch")
def vit_patch(cfg: ModelConfig) -> nn.Module:
    return VisionTransformerEmotion(cfg)


@register_model("vit_cnn")
def vit_cnn(cfg: ModelConfig) -> nn.Module:
    return VisionTransformerEmotionCNN(cfg)
