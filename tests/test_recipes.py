"""The training options of the published FER-2013 recipes: SGD with Nesterov momentum, a plateau schedule,
and an EMA whose decay warms up."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from helpers import tiny_model, tiny_run_config

from fervit.config import RunConfig, apply_overrides
from fervit.data.dataset import load_fer
from fervit.training.parts import build_ema, build_optimizer, ema_warmup_decay, parameter_groups
from fervit.training.schedule import WarmupPlateau, apply_now, build_schedule
from fervit.training.step import TrainStep
from fervit.training.trainer import train

CPU = torch.device("cpu")


def test_sgd_uses_nesterov_momentum_and_the_same_no_decay_groups_as_adamw():
    model = tiny_model()
    cfg = apply_overrides(RunConfig(), ["optim.name=sgd", "optim.lr=0.1", "optim.weight_decay=5e-4"])
    opt = build_optimizer(model, cfg, CPU)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["nesterov"] and g["lr"] == 0.1 for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    expected = parameter_groups(model, 5e-4)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in g["params"]] for g in expected]


def test_adamw_stays_the_default():
    assert isinstance(build_optimizer(tiny_model(), RunConfig(), CPU), torch.optim.AdamW)


def test_sgd_without_momentum_is_plain_sgd():
    cfg = apply_overrides(RunConfig(), ["optim.name=sgd", "optim.momentum=0"])
    assert not build_optimizer(tiny_model(), cfg, CPU).param_groups[0]["nesterov"]


def test_plateau_drops_after_patience_epochs_without_a_better_accuracy():
    s = WarmupPlateau(warmup_steps=4, factor=0.5, patience=2, min_ratio=0.01)
    assert [s(k) for k in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    drops = [s.epoch_end(acc) for acc in (0.30, 0.40, 0.40, 0.35, 0.45, 0.44, 0.44)]
    assert drops == [False, False, False, True, False, False, True]  # 2 stale epochs each time
    assert s(100) == pytest.approx(0.25)


def test_plateau_never_goes_below_min_ratio():
    s = WarmupPlateau(warmup_steps=0, factor=0.1, patience=1, min_ratio=0.05)
    s.epoch_end(0.5)
    for _ in range(5):
        s.epoch_end(0.1)
    assert s(0) == pytest.approx(0.05)


def test_a_plateau_drop_changes_the_very_next_steps_lr_and_the_time_budget_leaves_it_alone():
    model = tiny_model()
    cfg = apply_overrides(RunConfig(), ["optim.schedule=plateau", "optim.plateau_patience=1", "optim.lr=0.1",
                                        "optim.warmup_epochs=0"])
    opt = build_optimizer(model, cfg, CPU)
    schedule = build_schedule(cfg.optim, steps_per_epoch=10, epochs=60)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for _ in range(10):
        opt.step()
        scheduler.step()
    schedule.epoch_end(0.5)
    assert schedule.epoch_end(0.4)
    apply_now(scheduler)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.05])
    schedule.replan(20)  # the time budget: a plateau does not depend on the run's length
    assert schedule(20) == pytest.approx(0.5) and schedule(10_000) == pytest.approx(0.5)


def test_plateau_state_travels_in_the_schedulers_state_dict():
    cfg = apply_overrides(RunConfig(), ["optim.schedule=plateau", "optim.plateau_patience=1"])
    a = build_schedule(cfg.optim, 10, 60)
    a.epoch_end(0.5)
    a.epoch_end(0.4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    saved = json.loads(json.dumps(torch.optim.lr_scheduler.LambdaLR(opt, a).state_dict()))
    b = build_schedule(cfg.optim, 10, 60)
    torch.optim.lr_scheduler.LambdaLR(opt, b).load_state_dict(saved)
    assert (b.scale, b.best, b.stale) == (a.scale, a.best, a.stale) == (0.5, 0.5, 0)


def test_ema_warmup_decay_rises_from_a_tenth_to_the_configured_decay():
    n = torch.tensor([0.0, 1.0, 10.0, 90.0, 10_000.0])
    assert ema_warmup_decay(n, 0.999).tolist() == pytest.approx([0.1, 2 / 11, 11 / 20, 91 / 100, 0.999])
    assert ema_warmup_decay(torch.tensor(90.0), 0.9).item() == pytest.approx(0.9)


def ema_lag_after_ten_steps(warmup: bool) -> float:
    """How far the EMA lags behind the live weights after 10 training steps, as a fraction of how far those
    moved: 0 follows the live model, 1 is still at the initial weights. The steps are the trainer's own
    (`TrainStep`, which updates the EMA itself), not AveragedModel.update_parameters, which training never calls."""
    model = tiny_model(dropout=0.0)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    cfg = apply_overrides(RunConfig(), ["optim.ema_decay=0.999", f"optim.ema_warmup={warmup}"])
    ema = build_ema(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    step = TrainStep(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0), cfg, ema=ema)
    gen = torch.Generator().manual_seed(0)
    faces, y = torch.randint(0, 256, (8, 48, 48), dtype=torch.uint8, generator=gen), torch.arange(8) % 7
    for _ in range(10):
        step(faces, y, gen)
    live = torch.cat([p.detach().flatten() for p in model.parameters()])
    averaged = torch.cat([p.detach().flatten() for p in ema.module.parameters()])
    return float((averaged - live).norm() / (live - initial).norm())


def test_an_ema_with_warmup_follows_the_live_model_and_one_without_stays_at_the_start():
    assert ema_lag_after_ten_steps(warmup=True) < 0.2  # measured 0.06
    assert ema_lag_after_ten_steps(warmup=False) > 0.7  # measured 0.85: 0.999 barely moves in 10 steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_layout

    return load_fer(make_layout(tmp_path_factory.mktemp("recipes") / "fer", per_class=6), progress=False)


def metrics(run) -> list[dict]:
    return list(csv.DictReader(open(run / "training_metrics.csv")))


@pytest.mark.slow
@pytest.mark.parametrize("option, recorded", [
    (("optim.name=sgd", "optim.lr=0.05"), {"name": "sgd", "lr": 0.05}),
    (("optim.schedule=plateau", "optim.plateau_patience=1"), {"schedule": "plateau", "plateau_patience": 1}),
    (("optim.ema_decay=0.999", "optim.ema_warmup=true"), {"ema_decay": 0.999, "ema_warmup": True})])
def test_each_option_trains_end_to_end(option, recorded, data, tmp_path):
    run = train(tiny_run_config("train.epochs=2", "train.batch_size=16", *option, output=tmp_path), quiet=True,
                data=data)
    results = json.loads((run / "results.json").read_text())
    assert results["epochs_completed"] == 2
    assert all(math.isfinite(float(r["train_loss"])) for r in metrics(run))
    cm = torch.tensor(results["test"]["confusion_matrix"])
    assert int(cm.sum()) == results["test"]["num_samples"] > 0
    assert results["test"]["accuracy"] == pytest.approx(float(cm.diag().sum() / cm.sum()))
    saved = json.loads((run / "config.json").read_text())["optim"]
    assert {k: saved[k] for k in recorded} == recorded  # the run trained with the option, and says so


@pytest.mark.slow
def test_a_plateau_run_drops_the_lr_after_the_stale_epochs(data, tmp_path, monkeypatch):
    import fervit.training.trainer as trainer

    real_eval, accuracies = trainer.evaluate_split, iter([0.3, 0.5, 0.4, 0.4, 0.6])
    monkeypatch.setattr(trainer, "evaluate_split", lambda *a, **k: {**real_eval(*a, **k), "acc": next(accuracies)})
    run = train(tiny_run_config("train.epochs=5", "train.batch_size=16", "optim.schedule=plateau", "optim.lr=0.01",
                                "optim.plateau_patience=2", "optim.plateau_factor=0.5", "optim.warmup_epochs=0",
                                output=tmp_path), quiet=True, data=data)
    lrs = [float(r["lr"]) for r in metrics(run)]  # the lr each epoch started with
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.005])  # epochs 3 and 4 were stale: epoch 5 runs at half
