"""The pieces one training epoch is built from, each on its own: schedule, class weights, optimiser
groups, mixing, and the averages that results.json reports."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model

from fervit.config import AugmentConfig
from fervit.data.augment import mix_batch
from fervit.evaluation.metrics import classification_report
from fervit.training.epoch import class_weights, parameter_groups
from fervit.training.schedule import WarmupCosine


def test_warmup_rises_linearly_to_the_full_rate():
    s = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert [s(k) for k in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_falls_monotonically_to_min_ratio_and_stays_there():
    s = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    values = [s(k) for k in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert s(55) == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the cosine
    assert s(100) == pytest.approx(0.01) and s(500) == pytest.approx(0.01)


def test_replan_finishes_the_cosine_at_the_new_total_from_where_it_is():
    s = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    before = s(30)
    s.replan(50)
    assert s(30) < before  # the same step is now further along
    assert s(30) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert s(50) == pytest.approx(0.01)
    assert s(5) == pytest.approx(0.6)  # the warmup is not part of the plan


def test_replan_to_a_longer_total_follows_the_longer_cosine_from_the_step_reached():
    s = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert s(100) == pytest.approx(0.01)  # a finished run sits at the floor
    s.replan(190)  # --epochs on resume: 100 -> 190 steps
    longer = WarmupCosine(total_steps=190, warmup_steps=10, min_ratio=0.01)
    assert [s(k) for k in (100, 150, 190)] == [longer(k) for k in (100, 150, 190)]
    assert s(100) == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the longer cosine: back up to about half


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


def labelled_by_value(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n constant images whose pixel value is their label: a mix shows in both the same way."""
    y = torch.arange(n)
    return y.float().view(n, 1, 1, 1).expand(n, 1, 48, 48).clone(), y


@pytest.mark.parametrize("mode", [dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0)])
def test_mixing_mixes_images_and_targets_in_the_same_proportion(mode):
    x, y = labelled_by_value(6)
    torch.manual_seed(0)
    mixed, target = mix_batch(x, y, AugmentConfig(**mode), 6, torch.Generator().manual_seed(1))
    assert target.sum(1).tolist() == pytest.approx([1.0] * 6)
    assert not torch.equal(mixed, x)
    # each image's mean pixel is the label its soft target expects
    assert mixed.mean(dim=(1, 2, 3)).tolist() == pytest.approx((target * y.float()).sum(1).tolist(), abs=1e-5)


def test_mix_probability_zero_leaves_the_batch_and_gives_one_hot_targets():
    x, y = labelled_by_value(4)
    mixed, target = mix_batch(x, y, AugmentConfig(mixup_alpha=0.4, mix_p=0.0), 4, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, x) and torch.equal(target, torch.eye(4))


def test_macro_average_weighs_classes_equally_and_weighted_average_by_support():
    # class a: 3 of 4 right, never confused for; class b: its 1 right, plus a's miss predicted as b
    report = classification_report(torch.tensor([[3, 1], [0, 1]]), ["a", "b"])
    f1_a, f1_b = 2 * 1 * 0.75 / 1.75, 2 * 0.5 * 1 / 1.5
    assert report["macro_avg"] == pytest.approx({"precision": 0.75, "recall": 0.875, "f1": (f1_a + f1_b) / 2})
    assert report["weighted_avg"] == pytest.approx({"precision": 0.9, "recall": 0.8, "f1": 0.8 * f1_a + 0.2 * f1_b})
    assert report["weighted_avg"]["recall"] == pytest.approx(report["accuracy"])
