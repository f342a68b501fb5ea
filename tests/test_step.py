"""The training step as one callable: every mode computes what the trainer's eager loop computes."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from fervit.config import apply_overrides, load_preset
from fervit.errors import FervitError
from fervit.models import build_model
from fervit.benchmark.harness import optimizer_step
from fervit.benchmark.probes import fused_attention_backend, scaled_lr
from fervit.training.step import TrainStep
from fervit.data.augment import augment_batch
from fervit.training.parts import build_ema, build_optimizer, ema_warmup_decay

CPU = torch.device("cpu")
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def setup(*overrides: str):
    """A tiny model with optimiser, per-step schedule and EMA, and a 16-image uint8 dataset; seeded."""
    cfg = apply_overrides(load_preset("tiny"), ["train.batch_size=8", "optim.ema_decay=0.9", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg, CPU)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema_decay), use_buffers=True)
    data = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8, generator=data)
    labels = torch.randint(0, 7, (16,), generator=data)
    return cfg, model, optimizer, scheduler, ema, images, labels


def run_steps(step: TrainStep, images, labels, steps: int = 2) -> list[float]:
    """The trainer's batch order (one permutation, consecutive slices), fed to the step."""
    gen = torch.Generator().manual_seed(2)
    order = torch.randperm(len(images), generator=gen)
    losses = []
    for i in range(steps):
        idx = order[i * 8:(i + 1) * 8]
        loss, _ = step(images[idx], labels[idx], gen)
        losses.append(float(loss))
    return losses


def states(model, ema, optimizer) -> dict:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, s in enumerate(optimizer.state.values()):
        out.update({f"opt{i}.{k}": v for k, v in s.items()})
    return out


def reference_ema(model, cfg) -> torch.optim.swa_utils.AveragedModel:
    """torch's AveragedModel with its own EMA averaging, or (optim.ema_warmup) the same with the warm-up decay."""
    decay = cfg.optim.ema_decay
    average = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
    if cfg.optim.ema_warmup:
        @torch.no_grad()
        def average(ema_params, live_params, n_averaged):
            d = ema_warmup_decay(n_averaged.float(), decay)
            if torch.is_floating_point(ema_params[0]):
                torch._foreach_lerp_(ema_params, live_params, 1 - d)
            else:
                for e, p in zip(ema_params, live_params):
                    e.copy_(e * d + p * (1 - d))
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True)


def reference_steps(cfg, model, optimizer, scheduler, ema, images, labels, steps: int = 2) -> list[float]:
    """The trainer's step as it was written before TrainStep (augment, forward, cross-entropy, backward, clip,
    optimiser, schedule, AveragedModel's own EMA update), in the same batch order as `run_steps`."""
    gen = torch.Generator().manual_seed(2)
    order = torch.randperm(len(images), generator=gen)
    losses = []
    for i in range(steps):
        idx = order[i * 8:(i + 1) * 8]
        x = augment_batch(images[idx], cfg.augment, gen, cfg.model.crop_size)
        loss = F.cross_entropy(model(x).float(), labels[idx], label_smoothing=cfg.optim.label_smoothing)
        optimizer_step(loss, model, optimizer, scheduler, cfg.optim.grad_clip)
        ema.update_parameters(model)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("warmup", [False, True], ids=["ema", "ema_warmup"])
def test_the_eager_step_computes_exactly_what_the_trainers_step_computed(warmup):
    overrides = ["optim.ema_warmup=true"] if warmup else []
    cfg, model, optimizer, scheduler, _, images, labels = setup(*overrides)
    ema = reference_ema(model, cfg)
    expected_losses = reference_steps(cfg, model, optimizer, scheduler, ema, images, labels)
    reference = states(model, ema, optimizer)

    cfg, model, optimizer, scheduler, _, images, labels = setup(*overrides)
    ema = build_ema(model, cfg)
    step = TrainStep(model, optimizer, scheduler, cfg, ema=ema)
    losses = run_steps(step, images, labels)
    assert step.mode_used == "eager"
    assert losses == expected_losses
    got = states(model, ema, optimizer)
    assert got.keys() == reference.keys()
    for k, v in reference.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU (inductor) needs a C++ compiler, and none is on PATH")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # raised inside torch's compiler
def test_compiled_step_computes_what_the_eager_step_computes_over_two_steps():
    results = {}
    for mode in ("eager", "compile"):
        cfg, model, optimizer, scheduler, ema, images, labels = setup()
        step = TrainStep(model, optimizer, scheduler, cfg, ema=ema, mode=mode)
        assert step.mode_used == mode, "compilation fell back to eager; see the warning"
        results[mode] = (run_steps(step, images, labels), states(model, ema, optimizer))
    (eager_losses, eager), (compiled_losses, compiled) = results["eager"], results["compile"]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")


def test_cuda_graph_mode_off_cuda_warns_and_steps_eagerly():
    cfg, model, optimizer, scheduler, ema, images, labels = setup()
    with pytest.warns(UserWarning, match="cuda_graph needs a CUDA device"):
        step = TrainStep(model, optimizer, scheduler, cfg, ema=ema, mode="cuda_graph")
    assert step.mode_used == "eager"
    assert all(loss > 0 for loss in run_steps(step, images, labels, steps=1))


def test_a_failing_compile_falls_back_to_eager_and_leaves_weights_and_random_streams_alone(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no backend for this machine")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg, model, optimizer, scheduler, ema, images, labels = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = TrainStep(model, optimizer, scheduler, cfg, ema=ema, mode="compile")
    assert step.mode_used == "eager"
    assert any("step mode compile failed" in str(w.message) for w in caught)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_channels_last_changes_the_layout_not_the_result():
    results = {}
    for channels_last in (False, True):
        cfg, model, optimizer, scheduler, ema, images, labels = setup()
        step = TrainStep(model, optimizer, scheduler, cfg, ema=ema, channels_last=channels_last)
        results[channels_last] = (run_steps(step, images, labels, steps=1), states(model, ema, optimizer))
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    conv = next(k for k, v in results[True][1].items() if k.startswith("model.") and v.ndim == 4)
    assert results[True][1][conv].is_contiguous(memory_format=torch.channels_last)
    for k, v in results[False][1].items():
        torch.testing.assert_close(results[True][1][k], v, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_unknown_step_mode_is_a_one_line_error():
    cfg, model, optimizer, scheduler, ema, *_ = setup()
    with pytest.raises(FervitError, match="eager, compile, cuda_graph"):
        TrainStep(model, optimizer, scheduler, cfg, mode="graphs")


def test_lr_scales_with_the_square_root_of_the_batch_for_adamw_and_linearly_for_sgd():
    assert scaled_lr(1e-3, 128) == 1e-3
    assert scaled_lr(1e-3, 512) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 256) == pytest.approx(1e-3 * 2 ** 0.5)
    assert scaled_lr(0.1, 512, optimizer="sgd") == pytest.approx(0.4)
    with pytest.raises(FervitError, match="lion"):
        scaled_lr(1e-3, 256, optimizer="lion")


def test_fused_attention_check_says_cpu_runs_attention_as_batched_matmuls():
    report = fused_attention_backend(CPU)
    assert report["fused"] is False and report["backend"] is None and "batched matmuls" in report["detail"]
