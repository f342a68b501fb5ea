"""The pieces training is set up from (training/parts.py), each on its own: class weights and optimiser groups."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from fervit.training.parts import class_weights, parameter_groups


def test_class_weights_are_inverse_frequency_and_one_for_a_balanced_set():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights(labels, 3)
    assert w.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert (w[labels].sum() / len(labels)).item() == pytest.approx(1.0)  # the mean weight per example is 1
    assert class_weights(torch.arange(4).repeat(5), 4).tolist() == pytest.approx([1.0] * 4)


def test_a_class_missing_from_the_labels_does_not_divide_by_zero():
    assert torch.isfinite(class_weights(torch.tensor([0, 0, 1]), 3)).all()


def test_parameter_groups_exempt_biases_norms_and_the_models_declared_tokens():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert exempt | decayed == set(names.values()) and not exempt & decayed  # every parameter, once
    assert {"encoder.cls_token", "encoder.pos_embed"} <= exempt
    shapes = dict(model.named_parameters())
    assert all(shapes[n].ndim < 2 for n in exempt - {"encoder.cls_token", "encoder.pos_embed"})  # biases, norms
    assert "stem.0.weight" in decayed and all(p.ndim >= 2 for p in decay["params"])


def test_a_restored_optimizer_state_takes_the_layout_of_channels_last_weights():
    from fervit.training.parts import align_state_layout

    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(conv.parameters(), lr=1e-3, fused=True)
    saved = torch.randn(8, 3, 3, 3)  # as a checkpoint gives it back: contiguous
    optimizer.state[conv.weight] = {"exp_avg": saved.clone(), "step": torch.tensor(1.0)}
    align_state_layout(optimizer)
    state = optimizer.state[conv.weight]
    assert state["exp_avg"].stride() == conv.weight.stride() != saved.stride()
    assert torch.equal(state["exp_avg"], saved) and state["step"].item() == 1.0
