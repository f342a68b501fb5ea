"""Transformer building blocks shared by every fervit model, and the one weight-init function."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = Dropout(proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        dropout = self.attn_dropout if self.training else 0.0
        if x.device.type == "cpu":
            x = attention_math(q, k, v, dropout)
        else:  # fused kernel (flash / memory-efficient when available); scale is 1/sqrt(head_dim)
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(x))


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two batched matmuls: what SDPA's math backend computes.

    On a CPU the fused flash kernel is tiled for long sequences; at fervit's 26-145 tokens its backward is
    about 5x slower than these matmuls (BENCHMARKS.md, "Where the CPU step goes").
    """
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    attn = dropout_cpu(attn, dropout)  # the identity at 0
    return attn @ v


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


MASK_BITS = 16  # random bits per element of a CPU dropout mask: the drop probability is a multiple of 2^-16


def dropout_cpu(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout for a CPU tensor, its mask drawn from fewer random numbers than torch's.

    torch's CPU dropout draws a float Bernoulli per element on one thread, whatever torch's thread count. Here
    one 64-bit word of `random_words` gives four elements 16 bits each, and an element is kept
    when its bits reach the threshold: the drop probability is p rounded to 1/65536 (0.15 -> 0.149994), and
    the kept ones are scaled by exactly the inverse of the keep probability, so the expectation is unchanged.

    The mask is multiplied in as 0/1 values of x's dtype, never used as a bool: on a CPU `torch.where`,
    `masked_fill` and bool -> bf16 casts run unvectorised, 5-20x slower than a multiply, while the same bool
    bytes read as uint8 convert at memory speed (BENCHMARKS.md, "CPU: the bf16 path").
    """
    if p <= 0.0:
        return x
    levels = 1 << MASK_BITS
    threshold = min(round(p * levels), levels)
    if threshold == levels:
        return x * 0.0
    n = x.numel()
    bits = random_words((n + 3) // 4).view(torch.int16)[:n].view(x.shape)  # each uniform on [-2^15, 2^15)
    keep = bits.ge(threshold - levels // 2).view(torch.uint8).to(x.dtype)
    # two multiplies, not x * (keep * scale): the scale rounded to bf16 would bias the expectation by ~0.3%
    return (x * keep).mul_(levels / (levels - threshold))


def random_words(n: int) -> torch.Tensor:
    """n uniform 64-bit words (int64), from a numpy SFC64 stream seeded by one draw of torch's default generator.

    So torch.manual_seed and a restored RNG state give the same words, and numpy's generator fills them in
    half the time of torch's CPU `random_` (BENCHMARKS.md, "CPU: the bf16 path").
    """
    seed = torch.empty((), dtype=torch.int64).random_(-(1 << 63), None).item() & ((1 << 64) - 1)
    return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout; on a CPU in training mode `dropout_cpu`, whose mask is cheaper to draw."""
    if not training or p <= 0.0:
        return x
    if x.device.type == "cpu":
        return dropout_cpu(x, p)
    return F.dropout(x, p, True)


class Dropout(nn.Dropout):
    """nn.Dropout with `dropout`'s CPU mask; the same module otherwise (no parameters, identity in eval)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.0, attn_dropout: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) from the centre; a no-op when the input is no larger than that.

    Models trained on random crops (`model.crop_size`) take whole faces at evaluation and inference, so
    every caller (evaluate, predict, ONNX export, serve) keeps sending 48x48 faces. Smaller inputs pass as they
    are: progressive resizing (`augment.low_res`) trains on them.
    """
    h, w = x.shape[-2:]
    if h <= size and w <= size:
        return x
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def is_meta(module: nn.Module) -> bool:
    """Whether the module's own parameters live on the `meta` device (shapes without storage)."""
    return any(p.is_meta for p in module.parameters(recurse=False))


def init_weights(module: nn.Module) -> None:
    """The one init for every fervit model: truncated normal for linear layers, Kaiming for convs.

    Nothing to draw on the `meta` device (the model-file check builds there for shapes only): torch's meta
    `normal_` goes through torch._refs, whose first call imports torch._dynamo, about 1 s of every `predict`.
    """
    if is_meta(module):
        return
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
