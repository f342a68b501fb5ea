"""fervit.models.layers: the CPU dropout mask (the rest of the layers are specified in test_models.py)."""

import pytest
import torch
import torch.nn as nn

from fervit.config import ModelConfig
from fervit.models import build_model
from fervit.models.layers import MASK_BITS, Dropout, dropout, dropout_cpu

N = 1 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.15, 0.5])
def test_the_cpu_mask_drops_p_of_the_elements_in_each_of_the_four_quarters_of_a_draw(dtype, p):
    # every fourth element comes from the top 16 bits of a 64-bit draw, which hold its sign: a draw that
    # filled only [0, 2^63) would drop a different share there
    torch.manual_seed(0)
    out = dropout_cpu(torch.ones(N, dtype=dtype), p)
    dropped = (out == 0).float()
    sigma = (p * (1 - p) / (N / 4)) ** 0.5
    for quarter in range(4):
        assert abs(dropped[quarter::4].mean().item() - p) < 5 * sigma, quarter
    kept = out[out != 0].float()
    p_used = round(p * 2 ** MASK_BITS) / 2 ** MASK_BITS
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p_used)), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_the_cpu_mask_keeps_the_expectation_and_its_gradient_is_the_mask():
    torch.manual_seed(1)
    x = torch.randn(N, requires_grad=True)
    out = dropout_cpu(x, 0.2)
    out.sum().backward()
    kept = out != 0
    scale = 1 / (1 - round(0.2 * 2 ** MASK_BITS) / 2 ** MASK_BITS)
    assert torch.equal(x.grad, kept.float() * scale)
    assert torch.allclose(out[kept], x.detach()[kept] * scale)
    assert abs(dropout_cpu(torch.ones(N), 0.2).mean().item() - 1.0) < 0.01


def test_the_cpu_mask_follows_torch_manual_seed():
    x = torch.ones(4096)
    torch.manual_seed(7)
    a = dropout_cpu(x, 0.3)
    torch.manual_seed(7)
    b = dropout_cpu(x, 0.3)
    c = dropout_cpu(x, 0.3)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_dropout_is_the_identity_in_eval_and_at_zero_and_drops_everything_at_one():
    x = torch.randn(3, 5)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    module = Dropout(0.5).eval()
    assert module(x) is x


def test_every_dropout_of_the_transformer_models_draws_the_cpu_mask():
    model = build_model(ModelConfig(name="vit_cnn", dropout=0.15, head_hidden=192))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is Dropout for m in drops)
