"""Where a CPU training step goes: img/s of one training step per model shape, precision and layout, and the
attention and dropout kernels alone. The figures behind the `cpu` preset's shape (BENCHMARKS.md, "CPU: the
bf16 path"); `fervit bench` measures the shipped presets themselves.

    python -m fervit.benchmark.cpu_step_probe [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fervit.config import AugmentConfig, ModelConfig
from fervit.data.augment import augment_batch
from fervit.models import build_model
from fervit.models.layers import attention_math

VIT_VGG = dict(name="vit_vgg", crop_size=40, stem_channels=(32, 64, 128, 256), stem_convs=2, embed_dim=192,
               num_heads=6, mlp_dim=768)  # the cpu preset's model family and stem, varied below
SHAPES = {  # label -> (ModelConfig fields, bf16 + channels_last)
    "stem alone, bf16 NHWC": ({**VIT_VGG, "depth": 0, "pool": "mean", "dropout": 0.0}, True),
    "stem alone, fp32 NCHW": ({**VIT_VGG, "depth": 0, "pool": "mean", "dropout": 0.0}, False),
    "2 blocks, MLP 768, dropout 0.15": ({**VIT_VGG, "depth": 2}, True),
    "2 blocks, MLP 768, dropout 0": ({**VIT_VGG, "depth": 2, "dropout": 0.0}, True),
    "2 blocks, MLP 384, dropout 0 (cpu)": ({**VIT_VGG, "depth": 2, "dropout": 0.0, "mlp_dim": 384}, True),
    "4 blocks, MLP 768, dropout 0": ({**VIT_VGG, "depth": 4, "dropout": 0.0}, True),
}


def step_images_s(fields: dict, fast: bool, steps: int = 12, batch: int = 128) -> float:
    cfg = ModelConfig(**fields)
    model = build_model(cfg)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (batch, 48, 48), dtype=torch.uint8)
    labels = torch.randint(0, 7, (batch,))

    def step() -> None:
        x = augment_batch(images, AugmentConfig(), gen, cfg.crop_size)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            loss = F.cross_entropy(model(x).float(), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def kernel_ms(fn, runs: int = 20) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t0) / runs * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for label, (fields, fast) in SHAPES.items():
        print(f"{label:<40} {step_images_s(fields, fast):7.0f} img/s")
    q, k, v = (torch.randn(128, 6, 26, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    print(f"attention fwd+bwd, (128, 6, 26, 32) bf16: SDPA (flash on CPU) "
          f"{kernel_ms(lambda: F.scaled_dot_product_attention(q, k, v).float().sum().backward()):.1f} ms, "
          f"two matmuls {kernel_ms(lambda: attention_math(q, k, v).float().sum().backward()):.1f} ms")
    x = torch.randn(128, 26, 768, dtype=torch.bfloat16)
    print(f"dropout 0.15 on (128, 26, 768) bf16: {kernel_ms(lambda: F.dropout(x, 0.15, True)):.1f} ms")


if __name__ == "__main__":
    main()
