"""Progressive resizing (`augment.low_res`): the schedule, the smaller images, the positions, the time budget, the
refusals, and a run that resumes exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import make_layout
from helpers import signal_at_step, tiny_run_config

from fervit.config import AugmentConfig, apply_overrides, load_preset
from fervit.data.augment import augment_batch
from fervit.errors import FervitError
from fervit.training.budget import epochs_that_fit
from fervit.training.resolution import check_low_res, epoch_cost, training_side
from fervit.training.signals import Preempted
from fervit.training.trainer import train

SLOW_FIXTURES = {"reference"}


def fast(*overrides: str):
    # the sides below are written for 40 px crops (the preset trains 44 since 2026-12-02): pinned, so that the
    # arithmetic stays the test's and a preset change does not move it
    return apply_overrides(load_preset("cpu_fast"), ["model.crop_size=40", *overrides])


def test_the_first_share_of_the_planned_epochs_trains_small_and_costs_by_its_pixels():
    cfg = fast("augment.low_res=32", "augment.low_res_until=0.4")
    assert [training_side(cfg, e, 10) for e in range(1, 11)] == [32] * 4 + [40] * 6
    assert [training_side(cfg, e, 5) for e in range(1, 6)] == [32] * 2 + [40] * 3  # a shorter plan, an earlier switch
    assert epoch_cost(cfg, 1, 10) == pytest.approx(0.64) and epoch_cost(cfg, 5, 10) == 1.0
    off = fast()
    assert {training_side(off, e, 10) for e in range(1, 11)} == {40} and epoch_cost(off, 1, 10) == 1.0


def test_a_smaller_side_samples_the_same_view_on_a_coarser_grid():
    still = AugmentConfig(hflip=0.0, rotation=0.0, translate=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          brightness=0.0, contrast=0.0, erase_p=0.0)
    faces = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    whole = augment_batch(faces, still, torch.Generator().manual_seed(0))
    small = augment_batch(faces, still, torch.Generator().manual_seed(0), out_side=24)
    assert small.shape == (3, 1, 24, 24)
    # no augmentation: a 24-point grid over the face is a plain bilinear downscale of it
    torch.testing.assert_close(small, F.interpolate(whole, size=24, mode="bilinear", align_corners=False),
                               atol=1e-5, rtol=0)
    crops = augment_batch(faces, dataclasses.replace(still), torch.Generator().manual_seed(0), crop_size=40,
                          out_side=32)
    assert crops.shape == (3, 1, 32, 32)


def test_a_smaller_token_grid_gets_the_learned_positions_resampled():
    from fervit.models import build_model

    model = build_model(fast().model)
    encoder = model.encoder
    assert encoder.positions(25) is encoder.pos_embed  # the size it was made for: as learned
    small = encoder.positions(16)
    assert small.shape == (1, 17, encoder.pos_embed.shape[-1])
    torch.testing.assert_close(small[:, 0], encoder.pos_embed[:, 0])  # the [CLS] position is not on the grid
    grid = encoder.pos_embed[:, 1:].reshape(1, 5, 5, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)
    torch.testing.assert_close(small[:, 1:], want)
    with pytest.raises(ValueError, match="square grid"):
        encoder.positions(15)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


def test_the_time_budget_fits_more_epochs_when_the_first_ones_are_smaller():
    plain, small = fast(), fast("augment.low_res=32", "augment.low_res_until=0.5")
    assert epochs_that_fit(plain, 2, 60.0, 17 * 60, 40) == 2 + 17  # 17 full epochs fit in 17 minutes
    n = epochs_that_fit(small, 2, 60.0, 17 * 60, 40)
    assert n == 22  # half of 22 at 0.64: epochs 3-11 cost 9 x 0.64 and 12-22 cost 11, 16.8 minutes
    assert 60.0 * sum(epoch_cost(small, e, n) for e in range(3, n + 1)) <= 17 * 60
    assert 60.0 * sum(epoch_cost(small, e, n + 1) for e in range(3, n + 2)) > 17 * 60
    assert epochs_that_fit(plain, 5, 60.0, -10.0, 40) == 5 and epochs_that_fit(plain, 2, 0.0, 5.0, 30) == 30


def test_the_budget_judges_a_small_epoch_by_what_it_would_cost_at_full_size(monkeypatch):
    from types import SimpleNamespace

    import fervit.training.budget as budget
    from fervit.training.distributed import DistContext
    from fervit.training.trainer import TrainState, fit_time_budget

    monkeypatch.setattr(budget, "time", SimpleNamespace(time=lambda: 1000.0))
    cfg = fast("augment.low_res=32", "augment.low_res_until=0.5", "train.epochs=20", "train.time_budget_s=1000")
    replans = []
    run = SimpleNamespace(cfg=cfg, ctx=DistContext(), steps_per_epoch=10, log=lambda *a: None,
                          schedule=SimpleNamespace(replan=replans.append))
    state = TrainState(epochs=20, epoch=6, rows=[{"seconds": 32.0}] * 6)  # 32 s at 0.64: 50 s at full size
    fit_time_budget(run, state, t_start=1000.0 - 500.0)  # 500 s left
    # at 32 s an epoch 15 more would fit, the whole plan; at 50 s for each full-size epoch, 16 epochs in all do:
    # epochs 7-8 small (2 x 32 s) and 9-16 full (8 x 50 s) make 464 s, and a 17th plan would need 514 s
    assert state.epochs == 16 and replans == [160]


@pytest.mark.parametrize(("overrides", "says"), [
    (["augment.low_res=40"], "below the 40px side"),
    (["augment.low_res=4"], "cannot train on 4px images"),  # four stages pool 4 px away to nothing
    (["augment.low_res=32", "augment.enabled=false"], "augment.enabled is off"),
])
def test_a_side_the_model_cannot_train_at_is_one_line(overrides, says):
    with pytest.raises(FervitError, match=says) as e:
        check_low_res(fast(*overrides))
    assert "\n" not in str(e.value)


def test_out_of_range_settings_are_refused_by_the_config():
    for bad in ("augment.low_res=-8", "augment.low_res_until=1.0", "augment.low_res_until=0"):
        with pytest.raises(FervitError, match="augment.low_res"):
            fast(bad)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("low_res") / "fer", per_class=6)


def low_res_config(layout, out, *extra: str):
    return tiny_run_config("train.epochs=4", "train.batch_size=16", "augment.low_res=32", *extra, root=layout,
                           output=out)


@pytest.fixture(scope="module")
def reference(layout):
    return train(low_res_config(layout, layout.parent / "reference"), quiet=True)


def rows(run) -> list[str]:
    return [r.rsplit(",", 1)[0] for r in (run / "training_metrics.csv").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_trains_small_first_says_so_and_differs_from_a_plain_one(layout, reference, tmp_path, capsys):
    train(low_res_config(layout, tmp_path / "said"), quiet=False)
    said = capsys.readouterr().out
    assert "epochs 1-2 of 4 train on 32px images, the rest on 48px" in said
    assert "from epoch 3 on, 48px images" in said
    plain = train(tiny_run_config("train.epochs=4", "train.batch_size=16", root=layout, output=tmp_path / "plain"),
                  quiet=True)
    assert rows(reference)[1:] != rows(plain)[1:]


@pytest.mark.slow
def test_a_run_with_progressive_resizing_resumes_exactly(layout, reference, monkeypatch, tmp_path):
    signal_at_step(monkeypatch, 2 * (35 // 16) + 1)  # the first step of epoch 3, the first at full size
    with pytest.raises(Preempted) as stop:
        train(low_res_config(layout, tmp_path), quiet=True)
    monkeypatch.undo()
    train(low_res_config(layout, tmp_path), quiet=True, run_dir=stop.value.run_dir, resume=True)
    assert rows(stop.value.run_dir) == rows(reference)
