"""The CPU-shaped conv + transformer model (`vit_vgg`): a VGG-style stem brings the face down to a 5x5 or 6x6 token grid, and a
light ViT encoder (2-4 blocks) reads those 25-36 tokens.

Why this shape: on a CPU the transformer's cost grows with the token count, and `vit_cnn`'s 145 tokens make
it cost 2.4 GFLOP per training image (32 minutes an epoch on two cores), while the H200 runs showed the
convolutional stem carries the features. Here the stem does the spatial work at bf16 convolution speed and
the encoder mixes a few dozen tokens globally:

    face (1, S, S) -> stages of [3x3 conv + BN + ReLU] x stem_convs, a 2x2 max-pool after every stage but
                      the last -> (C, S/2^(n-1), S/2^(n-1)) -> tokens -> Linear C->D -> Encoder -> logits

With 4 stages a 40px crop gives 5x5 = 25 tokens, a 48px face 6x6 = 36. With `depth=0, pool=mean` it is the
stem alone (mean of its tokens -> head): the baseline the encoder must beat.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fervit.config import ModelConfig
from fervit.models.layers import center_crop, init_weights
from fervit.models.registry import register_model
from fervit.models.vit import Encoder, conv_stem


class VGGViTEmotion(nn.Module):
    """VGG-style stem -> a small token grid -> linear projection -> light ViT encoder (or mean pool at depth 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.stem_channels:
            raise ValueError("model.stem_channels needs at least one stage")
        if cfg.stem_convs < 1:
            raise ValueError(f"model.stem_convs must be at least 1, got {cfg.stem_convs}")
        self.input_size = cfg.trained_side()
        side = self.input_size // 2 ** (len(cfg.stem_channels) - 1)
        if side < 1:
            raise ValueError(f"{len(cfg.stem_channels)} stem stages shrink a {self.input_size}px image to nothing")
        self.stem = conv_stem(cfg.in_chans, tuple(cfg.stem_channels), cfg.stem_convs, pool_last=False)
        self.num_tokens = side * side
        self.proj = nn.Linear(cfg.stem_channels[-1], cfg.embed_dim)
        self.encoder = Encoder(cfg, self.num_tokens)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(center_crop(x, self.input_size))  # (B, C, s, s)
        return self.encoder(self.proj(x.flatten(2).transpose(1, 2)))  # tokens (B, s*s, D)


@register_model("vit_vgg")
def vit_vgg(cfg: ModelConfig) -> nn.Module:
    return VGGViTEmotion(cfg)
