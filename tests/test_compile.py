"""torch.compile is an optimisation only: the compiled model computes the eager model's logits and gradients."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from helpers import tiny_model

from fervit.training.parts import maybe_compile

CPU = torch.device("cpu")


def small_model() -> torch.nn.Module:
    """Small enough to compile in seconds, yet every kind of layer: conv stem, batch norm, attention, MLP head."""
    return tiny_model(dropout=0.0)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on CPU (inductor) needs a C++ compiler, and none is on PATH")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # raised inside torch's compiler
def test_compiled_model_matches_eager_logits_and_gradients_and_the_trial_step_trains_nothing():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    compiled = maybe_compile(model, "on", CPU, torch.zeros_like(x))
    assert compiled is not model, "compilation fell back to eager; see the warning"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the compile trial changed {k}"

    # train mode (dropout is 0, batch norm uses batch statistics): the graph the trainer runs
    eager_logits = model(x)
    eager_logits.square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled_logits = compiled(x)
    compiled_logits.square().sum().backward()

    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-4, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


def test_compile_auto_stays_eager_on_cpu():
    model = small_model()
    assert maybe_compile(model, "auto", CPU, torch.zeros(2, 1, 48, 48)) is model


def test_a_failing_compile_falls_back_to_the_eager_model_with_a_warning(monkeypatch):
    def broken_compile(module, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no backend for this machine")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = maybe_compile(model, "on", CPU, torch.zeros(2, 1, 48, 48))
    assert result is model
    assert any("torch.compile failed" in str(w.message) for w in caught)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
