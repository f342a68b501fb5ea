"""The learning-rate schedule: a linear warmup, then a cosine that a time budget or an extension re-plans."""

from __future__ import annotations

import math

import pytest

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
