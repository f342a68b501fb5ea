"""The averages that results.json reports, from a confusion matrix."""

from __future__ import annotations

import pytest
import torch

from fervit.evaluation.metrics import classification_report


def test_macro_average_weighs_classes_equally_and_weighted_average_by_support():
    # class a: 3 of 4 right, never confused for; class b: its 1 right, plus a's miss predicted as b
    report = classification_report(torch.tensor([[3, 1], [0, 1]]), ["a", "b"])
    f1_a, f1_b = 2 * 1 * 0.75 / 1.75, 2 * 0.5 * 1 / 1.5
    assert report["macro_avg"] == pytest.approx({"precision": 0.75, "recall": 0.875, "f1": (f1_a + f1_b) / 2})
    assert report["weighted_avg"] == pytest.approx({"precision": 0.9, "recall": 0.8, "f1": 0.8 * f1_a + 0.2 * f1_b})
    assert report["weighted_avg"]["recall"] == pytest.approx(report["accuracy"])
