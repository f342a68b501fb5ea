"""The residual CNN + ViT hybrid (`vit_resnet`): a ResNet-style stem hands a 10x10-12x12 token grid to the
shared ViT encoder.

Published from-scratch FER-2013 models that reach about 73% are all convolutional (ResNet-18, VGG) with
11-30M parameters; on our H200 runs a 351k-parameter conv stem alone beat every transformer variant.
So this family gives the encoder a strong residual stem instead of two plain conv layers:

    face (1, S, S) -> conv3x3 -> stages of BasicBlocks (each stage after the first halves H and W)
                   -> (C, S/2^(n-1), S/2^(n-1)) feature map -> tokens -> Linear C->D -> Encoder -> logits

With `depth=0, pool=mean` it is the stem alone (global average pool + head): the baseline the hybrid
must beat.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fervit.config import ModelConfig
from fervit.models.layers import center_crop, init_weights
from fervit.models.registry import register_model
from fervit.models.vit import Encoder


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv+BN, a projected shortcut when the shape changes, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


def residual_stem(in_chans: int, channels: tuple[int, ...], blocks: int) -> nn.Sequential:
    """conv3x3 + BN + ReLU at full resolution, then one stage of `blocks` BasicBlocks per entry of
    `channels`; every stage after the first starts with a stride-2 block."""
    layers: list[nn.Module] = [nn.Conv2d(in_chans, channels[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)]
    prev = channels[0]
    for i, ch in enumerate(channels):
        for j in range(blocks):
            layers.append(BasicBlock(prev, ch, stride=2 if i > 0 and j == 0 else 1))
            prev = ch
    return nn.Sequential(*layers)


class ResNetViTEmotion(nn.Module):
    """Residual CNN stem -> feature-map tokens -> linear projection -> ViT encoder (or mean pool at depth 0).

    The preset's stem (64, 128, 256 channels, 2 blocks each) on a 40x40 crop gives 256x10x10: 100 tokens.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.stem_channels:
            raise ValueError("model.stem_channels needs at least one stage")
        if cfg.stem_blocks < 1:
            raise ValueError(f"model.stem_blocks must be at least 1, got {cfg.stem_blocks}")
        self.input_size = cfg.trained_side()
        side = self.input_size
        for _ in cfg.stem_channels[1:]:
            side = (side + 1) // 2  # a stride-2 3x3 conv with padding 1 rounds up
        self.stem = residual_stem(cfg.in_chans, tuple(cfg.stem_channels), cfg.stem_blocks)
        self.num_tokens = side * side
        self.proj = nn.Linear(cfg.stem_channels[-1], cfg.embed_dim)
        self.encoder = Encoder(cfg, self.num_tokens)
        self.apply(init_weights)
        for m in self.modules():  # after the shared init, which sets every norm's weight to 1
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as its shortcut: deep stems train from step one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = center_crop(x, self.input_size)  # (B, 1, S, S): 48px faces -> the crop size the model trained on
        x = self.stem(x)  # (B, C, s, s)
        return self.encoder(self.proj(x.flatten(2).transpose(1, 2)))  # tokens (B, s*s, D)


@register_model("vit_resnet")
def vit_resnet(cfg: ModelConfig) -> nn.Module:
    return ResNetViTEmotion(cfg)
