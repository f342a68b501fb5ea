"""The full train -> evaluate path and its run folder, on a small slice of the real data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fervit.config import apply_overrides, load_preset
from fervit.data.images import normalize
from fervit.data.dataset import CLASSES, load_fer
from fervit.data.splits import make_splits
from fervit.evaluation.evaluate import evaluate
from fervit.evaluation.rerun import evaluate_checkpoint
from fervit.models.checkpoint import load_model
from fervit.training.trainer import train

ARTIFACTS = ("config.json", "best_model.safetensors", "best_model.json", "training_metrics.csv", "loss_curve.png",
             "accuracy_curve.png", "confusion_matrix.png", "reliability_diagram.png", "results.json")

# fixtures that take over 5 s to build: conftest marks every test that needs one slow
SLOW_FIXTURES = {"real_slice", "finished_run"}


@pytest.fixture(scope="module")
def real_slice(real_data):
    """40 training, 10 PublicTest and 10 PrivateTest faces per class from the real data."""
    data = load_fer(real_data, progress=False)
    picks = []
    for usage, n in ((1, 40), (2, 10), (3, 10)):
        for c in range(7):
            picks += torch.nonzero((data.usage == usage) & (data.labels == c)).flatten()[:n].tolist()
    return data.subset(picks)


def tiny_cfg(tmp_path, *extra):
    return apply_overrides(load_preset("tiny"), [f"train.output={tmp_path / 'runs'}", "train.device=cpu",
                                                 "data.protocol=fer2013", "train.eval_batch_size=64", *extra])


@pytest.fixture(scope="module")
def finished_run(real_slice, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    return train(tiny_cfg(tmp, "train.epochs=2", "optim.ema_decay=0.9"), quiet=True, data=real_slice)


def test_a_run_folder_holds_every_artifact(finished_run):
    name = finished_run.name
    assert name.split("_")[2:] == ["vit", "cnn", "ed32", "d1", "h2", "lr0.001"]
    for artifact in ARTIFACTS:
        assert (finished_run / artifact).stat().st_size > 0, artifact
    for png in ("loss_curve.png", "accuracy_curve.png", "confusion_matrix.png", "reliability_diagram.png"):
        with Image.open(finished_run / png) as im:
            assert im.format == "PNG" and im.width > 300
    assert not list(finished_run.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_metrics_csv_has_one_sane_row_per_epoch(finished_run):
    rows = list(csv.DictReader(open(finished_run / "training_metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    for r in rows:
        assert 0 < float(r["train_loss"]) < 5 and float(r["seconds"]) > 0
        correct = float(r["val_acc"]) * 70  # a count of the 70 validation faces, written to 6 digits
        assert correct == pytest.approx(round(correct), abs=1e-3) and 0 <= round(correct) <= 70


def test_results_json_reports_test_metrics_consistent_with_its_confusion_matrix(finished_run):
    res = json.loads((finished_run / "results.json").read_text())
    assert res["protocol"] == "fer2013" and res["split_sizes"] == {"train": 280, "val": 70, "test": 70}
    test = res["test"]
    cm = torch.tensor(test["confusion_matrix"])
    assert cm.shape == (7, 7) and int(cm.sum()) == 70
    assert test["accuracy"] == pytest.approx(float(cm.diag().sum()) / 70)
    assert set(test["per_class"]) == set(CLASSES)
    for c, name in enumerate(CLASSES):  # rows are true classes, columns predictions
        v, hit, predicted = test["per_class"][name], int(cm[c, c]), int(cm[:, c].sum())
        assert v["support"] == int(cm[c].sum()) == 10 and v["recall"] == pytest.approx(hit / 10)
        assert v["precision"] == pytest.approx(hit / predicted if predicted else 0.0)
        p, r = v["precision"], v["recall"]
        assert v["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
    assert {"macro_avg", "weighted_avg"} <= set(test)
    rows = list(csv.DictReader(open(finished_run / "training_metrics.csv")))
    assert res["best_val_acc"] == pytest.approx(max(float(r["val_acc"]) for r in rows), abs=1e-5)
    assert res["val"]["accuracy"] == pytest.approx(res["best_val_acc"])  # the saved model is the best epoch's
    cfg = json.loads((finished_run / "config.json").read_text())
    assert cfg["model"]["name"] == "vit_cnn" and cfg["train"]["epochs"] == 2


def test_evaluate_reproduces_the_saved_test_accuracy(finished_run, real_slice, tmp_path):
    saved = json.loads((finished_run / "results.json").read_text())["test"]["accuracy"]
    model, meta = load_model(finished_run)
    assert meta.classes == list(CLASSES)
    s = make_splits(real_slice, "fer2013")
    again = evaluate(model, real_slice.images, real_slice.labels, s.test)
    assert again["acc"] == pytest.approx(saved)


def test_evaluation_uses_no_augmentation(finished_run, real_slice):
    model, _ = load_model(finished_run)
    idx = torch.arange(16)
    a = evaluate(model, real_slice.images, real_slice.labels, idx)["logits"]
    b = evaluate(model, real_slice.images, real_slice.labels, idx)["logits"]
    with torch.no_grad():
        direct = model(normalize(real_slice.images[idx]))
    assert torch.equal(a, b) and torch.allclose(a, direct, atol=1e-5)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_numbers(real_slice, tmp_path):
    runs = [train(tiny_cfg(tmp_path / str(k), "train.epochs=1"), quiet=True, data=real_slice) for k in range(2)]
    metrics = [[{k: v for k, v in r.items() if k != "seconds"}
                for r in csv.DictReader(open(run / "training_metrics.csv"))] for run in runs]
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    assert metrics[0] == metrics[1]
    assert results[0]["test"]["confusion_matrix"] == results[1]["test"]["confusion_matrix"]


def spy_on_epochs(monkeypatch) -> list:
    """Record the step and the batches of every epoch the trainer runs."""
    import fervit.training.trainer as trainer

    seen, real_epoch = [], trainer.train_one_epoch

    def spy(step, batches, bar=None, **kwargs):
        seen.append((step, batches))
        return real_epoch(step, batches, bar, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", spy)
    return seen


def few_disgusted(real_slice):
    """The slice with 4 training faces of "disgusted" instead of 40: a uniform draw gives it 4 of 244."""
    keep = [i for i in range(len(real_slice))
            if not (real_slice.labels[i] == 1 and real_slice.usage[i] == 1) or i % 10 == 0]
    return real_slice.subset(keep)


@pytest.mark.slow
def test_balanced_class_weights_weigh_the_loss_by_inverse_frequency(real_slice, tmp_path, monkeypatch):
    seen = spy_on_epochs(monkeypatch)
    train(tiny_cfg(tmp_path, "train.epochs=1", "optim.class_weights=balanced"), quiet=True,
          data=few_disgusted(real_slice))
    ((step, batches),) = seen
    expected = torch.full((7,), 244 / (7 * 40))
    expected[1] = 244 / (7 * 4)
    assert torch.allclose(step.loss_weights.cpu(), expected) and batches.sample_weights is None


@pytest.mark.slow
def test_the_balanced_sampler_draws_every_class_about_equally_often(real_slice, tmp_path, monkeypatch):
    from fervit.training.epoch import epoch_order

    seen = spy_on_epochs(monkeypatch)
    train(tiny_cfg(tmp_path, "train.epochs=1", "optim.sampler=balanced"), quiet=True, data=few_disgusted(real_slice))
    ((step, batches),) = seen
    draws = torch.cat([batches.labels[epoch_order(batches)] for _ in range(20)]).cpu()
    share = torch.bincount(draws, minlength=7).float() / len(draws)
    assert share.min() > 0.11 and share.max() < 0.18 and step.loss_weights is None  # 1/7 = 0.143


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_train_then_evaluate_then_runs(real_data, tmp_path):
    """The documented commands, end to end, as a user types them, on a copy of 20 real faces per class."""
    import shutil

    root = tmp_path / "fer"
    for split in ("train", "test"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for src in sorted((real_data / split / name).iterdir())[:20]:
                shutil.copy(src, root / split / name / src.name)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "fervit", "train", "--preset", "tiny", "--data", str(root), "--epochs", "1",
           "--output", str(out), "--device", "cpu", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    run_dir = out / done.stdout.strip().splitlines()[-1].split("/")[-1]
    ev = subprocess.run([sys.executable, "-m", "fervit", "evaluate", str(run_dir), "--split", "val"],
                        capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr
    assert "on seed/val (14 images)" in ev.stdout
    assert (run_dir / "confusion_matrix_val.png").is_file()
    table = subprocess.run([sys.executable, "-m", "fervit", "runs", str(out)], capture_output=True, text=True)
    assert run_dir.name in table.stdout and "vit_cnn" in table.stdout


@pytest.mark.slow
def test_ctrl_c_still_finishes_the_run_folder(real_slice, tmp_path, monkeypatch):
    import fervit.training.trainer as trainer

    real_epoch = trainer.train_one_epoch
    calls = {"n": 0}

    def interrupt_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt_second_epoch)
    run = train(tiny_cfg(tmp_path, "train.epochs=5"), quiet=True, data=real_slice)
    res = json.loads((run / "results.json").read_text())
    assert res["interrupted"] is True and res["epochs_completed"] == 1
    for artifact in ARTIFACTS:
        assert (run / artifact).is_file()


def test_evaluate_an_ensemble_needs_an_output_folder(finished_run, real_data):
    from fervit.errors import FervitError

    with pytest.raises(FervitError, match="needs --output"):
        evaluate_checkpoint([str(finished_run), str(finished_run)], data_root=str(real_data))


@pytest.mark.slow
def test_early_stopping_ends_a_run_that_stops_improving(real_slice, tmp_path, monkeypatch):
    import fervit.training.trainer as trainer

    real_eval, accuracies = trainer.evaluate_split, iter([0.3, 0.5, 0.5, 0.4, 0.9, 0.9])

    def plateau_after_epoch_2(*args, **kwargs):  # validation accuracy as scripted, whatever the weights
        return {**real_eval(*args, **kwargs), "acc": next(accuracies)}

    monkeypatch.setattr(trainer, "evaluate_split", plateau_after_epoch_2)
    run = train(tiny_cfg(tmp_path, "train.epochs=6", "train.early_stop_patience=2"), quiet=True, data=real_slice)
    res = json.loads((run / "results.json").read_text())
    assert res["epochs_completed"] == 4 and res["best_epoch"] == 2 and "early stop" in res["stopped"]


@pytest.mark.slow
def test_time_budget_caps_the_epochs_after_the_second(real_slice, tmp_path):
    run = train(tiny_cfg(tmp_path, "train.epochs=8", "train.time_budget_s=0.001"), quiet=True, data=real_slice)
    res = json.loads((run / "results.json").read_text())
    assert res["epochs_completed"] == 2 and res["epochs_planned"] == 2


def budget_run(budget_s: float, epochs: int = 10):
    """What fit_time_budget reads of a run: its config, process group, schedule (recording re-plans) and log."""
    from types import SimpleNamespace

    from fervit.training.distributed import DistContext

    from fervit.config import RunConfig

    replans = []
    cfg = RunConfig()
    cfg.train.time_budget_s, cfg.train.epochs = budget_s, epochs
    run = SimpleNamespace(cfg=cfg, ctx=DistContext(), steps_per_epoch=10, log=lambda *a: None,
                          schedule=SimpleNamespace(replan=replans.append))
    return run, replans


NOW = 1_000_000.0  # the trainer's clock in the budget tests: elapsed times are exact, however slow the machine


@pytest.fixture
def frozen_clock(monkeypatch):
    from types import SimpleNamespace

    import fervit.training.trainer as trainer

    import fervit.training.budget as budget

    monkeypatch.setattr(trainer, "time", SimpleNamespace(time=lambda: NOW))
    monkeypatch.setattr(budget, "time", SimpleNamespace(time=lambda: NOW))


def test_the_time_budget_is_rechecked_after_every_epoch_and_a_slowdown_lowers_the_plan_again(frozen_clock):
    from fervit.training.trainer import TrainState, fit_time_budget

    run, replans = budget_run(100.0)
    state = TrainState(epochs=10, epoch=5, rows=[{"seconds": s} for s in (10.0, 10.0, 10.0, 20.0, 20.0)])
    fit_time_budget(run, state, t_start=NOW - 70)  # 30 s left; the last epochs took 20 s: 1 more fits
    assert state.epochs == 6 and replans == [60]
    fit_time_budget(run, state, t_start=NOW - 30)  # faster than planned: after epoch 4 the plan is never raised
    assert state.epochs == 6 and replans == [60]
    fit_time_budget(run, state, t_start=NOW - 150)  # already past the budget: stop after this epoch
    assert state.epochs == 5 and replans == [60, 50]


def test_one_epoch_slowed_by_a_passing_job_does_not_cut_the_plan(frozen_clock):
    from fervit.training.trainer import TrainState, fit_time_budget

    run, replans = budget_run(300.0, epochs=20)
    state = TrainState(epochs=20, epoch=10, rows=[{"seconds": 10.0}] * 9 + [{"seconds": 40.0}])
    fit_time_budget(run, state, t_start=NOW - 130)  # 170 s left at about 13 s an epoch: the 10 left still fit
    assert state.epochs == 20 and replans == []  # judged by the 40 s epoch alone, only 4 more would have fitted


def test_a_plan_cut_by_a_slow_early_epoch_rises_again_but_only_early_in_the_run(frozen_clock):
    from fervit.training.trainer import TrainState, fit_time_budget

    run, replans = budget_run(200.0, epochs=20)
    state = TrainState(epochs=20, epoch=2, rows=[{"seconds": 10.0}, {"seconds": 40.0}])
    fit_time_budget(run, state, t_start=NOW - 50)  # 150 s left at 40 s an epoch: 3 more
    assert state.epochs == 5
    state.epoch, state.rows = 4, state.rows + [{"seconds": 10.0}] * 2
    fit_time_budget(run, state, t_start=NOW - 100)  # 100 s left at 10 s (the median of 40, 10, 10): 10 more
    assert state.epochs == 14 and replans == [50, 140]
    state.epoch, state.rows = 5, state.rows + [{"seconds": 5.0}]
    fit_time_budget(run, state, t_start=NOW - 75)  # 125 s left at 10 s: 12 more would fit, but from epoch 5 on
    assert state.epochs == 14 and replans == [50, 140]  # the plan only comes down


def test_an_early_plan_never_rises_past_the_epochs_asked_for(frozen_clock):
    from fervit.training.trainer import TrainState, fit_time_budget

    run, replans = budget_run(1000.0, epochs=8)
    state = TrainState(epochs=6, epoch=3, rows=[{"seconds": 10.0}] * 3)
    fit_time_budget(run, state, t_start=NOW - 30)  # 97 more would fit
    assert state.epochs == 8 and replans == [80]


def test_a_run_extended_with_more_epochs_is_not_cut_back_by_its_old_time_budget(frozen_clock):
    from fervit.training.trainer import TrainState, plan_next

    run, replans = budget_run(10.0)
    run.cfg.train.early_stop_patience = 0
    state = TrainState(epochs=20, epoch=12, rows=[{"seconds": 1.0}] * 12, budgeted=False)
    plan_next(run, state, state.rows[-1], t_start=NOW - 50, on_epoch=None)
    assert state.epochs == 20 and replans == []
    state.budgeted = True  # the same run with its budget still in force is cut back to the epoch it is in
    plan_next(run, state, state.rows[-1], t_start=NOW - 50, on_epoch=None)
    assert state.epochs == 12 and replans == [120]


@pytest.mark.slow
def test_a_checkpoint_moved_out_of_its_run_folder_is_evaluated_on_its_own_split(finished_run, real_data, tmp_path):
    """Without config.json beside it (the shipped model, a copied file), the split comes from the JSON description:
    this run used the fer2013 protocol, so its test split is PrivateTest, not the seed protocol's test/ folder."""
    import shutil

    for name in ("best_model.safetensors", "best_model.json"):
        shutil.copy(finished_run / name, tmp_path / name)
    assert json.loads((tmp_path / "best_model.json").read_text())["split"]["protocol"] == "fer2013"
    summary = evaluate_checkpoint(str(tmp_path / "best_model.safetensors"), data_root=str(real_data), device="cpu")
    assert "fer2013/test (3589 images)" in summary, summary
    assert json.loads((tmp_path / "results.json").read_text())["test"]["num_samples"] == 3589
