"""Training on a CPU at its own speed: bf16 autocast and channels_last where they pay, computing what fp32 does."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from fervit import device as fervit_device
from fervit.config import RunConfig, apply_overrides, load_preset
from fervit.data.images import normalize
from fervit.device import amp_choice, channels_last_choice
from fervit.models import build_model, create_model
from fervit.training.parts import build_optimizer
from fervit.training.step import TrainStep

CPU = torch.device("cpu")
BF16_CPU = fervit_device.cpu_bf16()[0]


def small_vgg_config(*overrides: str) -> RunConfig:
    """A small `vit_vgg` (the cpu preset's shape, narrower) that trains a few hundred steps in seconds."""
    return apply_overrides(load_preset("cpu"), [
        "model.stem_channels=8,16,32,32", "model.stem_convs=1", "model.embed_dim=32", "model.num_heads=2",
        "model.mlp_dim=64", "model.head_hidden=32", "model.depth=1", "optim.ema_decay=0", "train.batch_size=32",
        *overrides])


def test_vit_vgg_turns_a_40px_crop_into_25_tokens_and_a_48px_face_into_36():
    cropped = create_model("vit_vgg", stem_channels=(8, 16, 32, 32), stem_convs=1, crop_size=40, embed_dim=32,
                           num_heads=2, depth=1)
    whole = create_model("vit_vgg", stem_channels=(8, 16, 32, 32), stem_convs=1, embed_dim=32, num_heads=2, depth=1)
    assert cropped.num_tokens == 25 and whole.num_tokens == 36
    faces = torch.randn(3, 1, 48, 48)
    assert cropped(faces).shape == whole(faces).shape == (3, 7)


def test_vit_vgg_at_depth_0_is_the_stem_alone():
    stem = create_model("vit_vgg", stem_channels=(8, 16, 32, 32), stem_convs=1, depth=0, pool="mean", embed_dim=32)
    assert len(stem.encoder.blocks) == 0
    assert not any(isinstance(m, nn.MultiheadAttention) or type(m).__name__ == "Attention" for m in stem.modules())


def test_amp_auto_is_bf16_on_a_cpu_with_native_bf16_and_says_why(monkeypatch):
    monkeypatch.setattr(fervit_device, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    dtype, why = amp_choice("auto", CPU)
    assert dtype is torch.bfloat16 and "avx512_bf16" in why


def test_amp_auto_stays_fp32_on_a_cpu_without_native_bf16_and_says_so(monkeypatch):
    monkeypatch.setattr(fervit_device, "cpu_flags", lambda: {"avx2", "fma"})  # an AVX2-only CPU
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # oneDNN would emulate it
    dtype, why = amp_choice("auto", CPU)
    assert dtype is None and "no native bf16" in why
    assert amp_choice("bf16", CPU)[0] is torch.bfloat16  # asked for by name, it is used anyway
    assert amp_choice("off", CPU)[0] is None


def test_channels_last_auto_is_on_for_convolutions_on_a_cpu_only():
    conv = create_model("vit_vgg", stem_channels=(8, 16), stem_convs=1, depth=1, embed_dim=32, num_heads=2)
    assert channels_last_choice("auto", conv, CPU) == (True, "auto: the model has convolutions")
    assert channels_last_choice("auto", nn.Linear(4, 4), CPU)[0] is False
    assert channels_last_choice("auto", conv, torch.device("cuda"))[0] is False
    assert channels_last_choice("off", conv, CPU)[0] is False and channels_last_choice("on", conv, CPU)[0] is True


def test_old_configs_with_a_boolean_channels_last_still_load():
    cfg = RunConfig.from_dict({"train": {"channels_last": True}})
    assert cfg.train.channels_last == "on"
    assert RunConfig.from_dict({"train": {"channels_last": False}}).train.channels_last == "off"


def test_the_cpu_optimiser_is_fused_not_the_per_parameter_loop():
    cfg = small_vgg_config()
    model = build_model(cfg.model)
    assert build_optimizer(model, cfg, CPU).defaults["fused"] is True
    cfg.optim.name = "sgd"
    assert build_optimizer(model, cfg, CPU).defaults["fused"] is True


def one_step(cfg: RunConfig, amp, channels_last: bool, images, labels):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg, CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = TrainStep(model, optimizer, scheduler, cfg, amp_dtype=amp, channels_last=channels_last)
    loss, _ = step(images, labels, torch.Generator().manual_seed(1))
    return float(loss), torch.cat([p.grad.flatten() for p in model.parameters()])  # the step keeps its gradients


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no native bf16: fervit trains it in fp32")
def test_a_bf16_step_computes_what_the_fp32_step_computes():
    """Tolerance: bf16 keeps 8 bits of mantissa, so the loss agrees to about 1% and the gradient points the same
    way (cosine > 0.99; oneDNN accumulates in fp32). Not the weight update: AdamW's first step is lr * sign(grad),
    which flips for every gradient near zero."""
    cfg = small_vgg_config()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 48, 48), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 7, (32,), generator=gen)
    loss32, grad32 = one_step(cfg, None, False, images, labels)
    loss16, grad16 = one_step(cfg, torch.bfloat16, True, images, labels)
    assert loss16 == pytest.approx(loss32, rel=0.01)
    assert float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.99


def striped_faces(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 48x48 "faces" whose class is the row of a faint horizontal bar: learnable in a few hundred steps,
    yet not before the first few dozen (a convolution has to find the bar under the noise)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 7, (n,), generator=gen)
    rows = torch.arange(48)
    bar = ((rows >= 4 + 6 * labels[:, None]) & (rows < 8 + 6 * labels[:, None])).float()  # (n, 48)
    images = torch.randn(n, 48, 48, generator=gen) * 45 + 110 + 30 * bar[:, :, None]
    return images.clamp(0, 255).to(torch.uint8), labels


@pytest.mark.slow
@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no native bf16: fervit trains it in fp32")
def test_two_hundred_bf16_steps_reach_the_accuracy_of_fp32():
    train_x, train_y = striped_faces(2048, 0)
    test_x, test_y = striped_faces(1024, 1)
    accuracy = {}
    for name, amp, nhwc in (("fp32", None, False), ("bf16", torch.bfloat16, True)):
        cfg = small_vgg_config("augment.enabled=false", "optim.lr=2e-3")
        torch.manual_seed(0)
        model = build_model(cfg.model)
        optimizer = build_optimizer(model, cfg, CPU)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        step = TrainStep(model, optimizer, scheduler, cfg, amp_dtype=amp, channels_last=nhwc)
        gen = torch.Generator().manual_seed(0)
        for _ in range(200):
            idx = torch.randint(0, len(train_x), (32,), generator=gen)
            step(train_x[idx], train_y[idx], gen)
        model.eval()
        with torch.no_grad():
            accuracy[name] = float((model(normalize(test_x)).argmax(-1) == test_y).float().mean())
    assert accuracy["fp32"] > 0.9, accuracy  # the task is learnable at this budget ...
    assert abs(accuracy["bf16"] - accuracy["fp32"]) < 0.03, accuracy  # ... and bf16 learns it as well


def test_the_inference_path_never_imports_torch_dynamo():
    """`fervit predict` on one face: the model-file check builds the model on the meta device, whose normal_()
    would import torch._dynamo (about 1 s) if weights were drawn there."""
    code = ("import sys, numpy as np; from fervit.inference.predictor import Predictor; "
            "p = Predictor.load(); p.classify(np.zeros((1, 48, 48), np.uint8)); "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_train_without_a_preset_picks_the_cpu_preset_on_a_cpu_and_says_so(monkeypatch, capsys):
    from fervit.cli import build_parser
    from fervit.cli.train import config_from_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert cfg.model.name == "vit_vgg" and cfg.model.depth == 0  # cpu_cnn: the stem, which beat the cpu preset
    assert "no --preset, so cpu_cnn" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config_from_args(build_parser().parse_args(["train"])).model.name == "vit_cnn"


def test_the_fast_cpu_preset_fits_its_twenty_minutes_by_a_time_budget():
    cfg = load_preset("cpu_fast")
    assert 0 < cfg.train.time_budget_s <= 20 * 60 and cfg.data.protocol == "fer2013"
    # the budget, not an epoch cap, decides how long it trains: a machine at 30 s an epoch (this one runs 38-69)
    # still fills its minutes
    assert cfg.train.epochs * 30 >= cfg.train.time_budget_s
