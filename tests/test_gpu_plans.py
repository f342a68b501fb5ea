"""The GPU plans (experiments/plans/*.json) are valid recipes, and the experiment script picks and reports honestly."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fervit.config import apply_overrides, load_preset
from fervit.models import build_model

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PLANS = sorted((EXPERIMENTS / "plans").glob("*.json"))
H200_RUNS = Path(__file__).resolve().parents[2] / "shared" / "gpu-runs" / "2026-11-29"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("plan", PLANS, ids=[p.stem for p in PLANS])
def test_every_plan_job_is_a_valid_recipe_whose_model_builds(plan):
    data = json.loads(plan.read_text())
    # training, plus start-up, overrun, evaluations and packing: 93 s for 4 jobs and 113 s for 5 on the H200
    # (2026-11-29), so about 40 s + 25 s per job leaves room for the ten-crop evaluations; all in 9 minutes
    assert data.get("budget", 420) + 40 + 25 * len(data["jobs"]) <= 9 * 60
    for job in data["jobs"]:
        preset = "hybrid" if job["preset"] == "@best" else job["preset"]
        cfg = apply_overrides(load_preset(preset), job.get("set", []))
        assert not (cfg.train.tta == "ten_crop" and not cfg.model.crop_size), job["name"]
        build_model(cfg.model)
    for members in data.get("ensembles", {}).values():
        assert set(members) <= {j["name"] for j in data["jobs"]}


def test_the_new_plans_log_the_time_to_73_percent_and_let_the_time_budget_end_every_screen_job():
    for name in ("screen", "screen2", "seeds", "solo"):
        data = json.loads((EXPERIMENTS / "plans" / f"{name}.json").read_text())
        assert all("train.log_test=true" in job["set"] for job in data["jobs"])
    for name in ("screen", "screen2"):  # an epoch cap below what fits the budget would end a fast job early
        data = json.loads((EXPERIMENTS / "plans" / f"{name}.json").read_text())
        assert all("train.epochs=300" in job["set"] for job in data["jobs"])


def summary_of(jobs: dict[str, tuple[float, float]], sets: dict[str, list[str]] | None = None) -> dict:
    sets = sets or {}
    return {"plan": {"jobs": [{"name": n, "preset": "hybrid", "set": sets.get(n, [])} for n in jobs]},
            "jobs": {n: {"val_acc": v, "test_acc": t, "params": 1, "epochs": 3, "best_epoch": 2,
                         "disgusted_recall": 0.1} for n, (v, t) in jobs.items()},
            "ensembles": {}}


def test_best_picks_the_job_with_the_highest_publictest_accuracy_never_privatetest(tmp_path):
    gpu = load_script("gpu_experiment")
    screen = tmp_path / "screen.json"
    screen.write_text(json.dumps(summary_of({"a": (0.70, 0.75), "b": (0.72, 0.71)}, {"b": ["optim.name=sgd"]})))
    job = gpu.resolve_job({"name": "s1", "preset": "@best", "set": ["train.seed=1"]}, [str(screen)])
    assert job["picked"] == "b" and job["set"] == ["optim.name=sgd", "train.seed=1"]
    with pytest.raises(SystemExit, match="--pick-from"):
        gpu.resolve_job({"name": "s1", "preset": "@best"}, None)


def test_best_among_hybrids_skips_a_better_stem_alone_and_reads_several_screens(tmp_path):
    gpu = load_script("gpu_experiment")
    one, two = tmp_path / "screen.json", tmp_path / "screen2.json"
    one.write_text(json.dumps(summary_of({"hybrid": (0.70, 0.7), "hybrid_cnn": (0.75, 0.7)})))
    two.write_text(json.dumps(summary_of({"hybrid_plateau": (0.71, 0.7), "vit_cnn_warm": (0.74, 0.7)})))
    job = gpu.resolve_job({"name": "s0", "preset": "@best", "among": ["hybrid", "hybrid_plateau"]},
                          [str(one), str(two)])
    assert job["picked"] == "hybrid_plateau"
    plans = [json.loads((EXPERIMENTS / "plans" / f"{n}.json").read_text()) for n in ("seeds", "solo")]
    assert all("hybrid_cnn" not in job["among"] for plan in plans for job in plan["jobs"])


def test_the_time_to_an_accuracy_is_read_off_the_logged_test_column(tmp_path):
    gpu = load_script("gpu_experiment")
    rows = ["epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds,test_acc",
            "1,0.1,1,0.5,1,0.5,10,0.60", "2,0.1,1,0.6,1,0.6,10,0.71", "3,0.1,1,0.7,1,0.7,10,0.735"]
    (tmp_path / "training_metrics.csv").write_text("\n".join(rows) + "\n")
    curve = gpu.training_curve(tmp_path)
    assert curve["time_to_0.70"] == {"seconds": 20.0, "epoch": 2}
    assert curve["time_to_0.73"] == {"seconds": 30.0, "epoch": 3}
    assert curve["final_train_acc"] == 0.7 and curve["best_logged_test_acc"] == 0.735


def test_the_report_gives_seed_means_and_names_the_publictest_best(tmp_path):
    report = load_script("report_runs")
    path = tmp_path / "summary.json"
    sets = {f"s{i}": [f"train.seed={i}", "train.log_test=true"] for i in range(3)}
    path.write_text(json.dumps(summary_of({"s0": (0.70, 0.72), "s1": (0.71, 0.74), "s2": (0.72, 0.73)}, sets)))
    text = report.report(path)
    assert "Best on PublicTest: `s2` (72.0%); its PrivateTest: 73.0%." in text
    assert "PublicTest 71.0 ± 1.0%, PrivateTest 73.0 ± 1.0%" in text


@pytest.mark.skipif(not (H200_RUNS / "call1-summary.json").is_file(), reason="the H200 runs are not beside the repo")
def test_the_report_reads_the_first_h200_summary():
    text = load_script("report_runs").report(H200_RUNS / "call1-summary.json")
    assert "| `cnn_deep` |" in text and "**62.4%**" in text
    assert "Best on PublicTest: `cnn_deep` (61.1%)" in text


@pytest.mark.parametrize("content", [None, "{not json", "[]", '{"jobs": {}}'], ids=["missing", "damaged", "list", "no_plan"])
def test_a_summary_that_is_missing_or_damaged_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "summary.json"
    if content is not None:
        path.write_text(content)
    assert load_script("report_runs").main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"report_runs: error: '{path}' is not a readable summary")


def damaged(change):
    summary = summary_of({"s0": (0.70, 0.72), "s1": (0.71, 0.74)},
                         {"s0": ["train.seed=0"], "s1": ["train.seed=1"]})
    change(summary)
    return summary


# issue 21: a damaged summary picked its best job from string accuracies and grouped different recipes as seeds
@pytest.mark.parametrize("change, says", [
    (lambda s: s["jobs"]["s0"].update(val_acc="0.9"), "job 's0': 'val_acc' must be an accuracy in [0, 1], got \"0.9\""),
    (lambda s: s["jobs"]["s1"].update(test_acc=True), "'test_acc' must be an accuracy"),
    (lambda s: s["jobs"]["s0"].update(val_acc=71.0), "'val_acc' must be an accuracy in [0, 1], got 71.0"),
    (lambda s: s["plan"]["jobs"][0].update(set="model.depth=2"), "\"set\" must be a list of KEY=VALUE strings"),
    (lambda s: s["plan"]["jobs"][1].update(name="s0"), "plan job names must be unique"),
    (lambda s: s["plan"]["jobs"][0].pop("preset"), "needs a \"name\" and a \"preset\""),
    (lambda s: s["jobs"].update(ghost={"val_acc": 0.5}), "job 'ghost' is not in the plan"),
    (lambda s: s["jobs"]["s0"].update(params="1M"), "'params' must be an integer"),
    (lambda s: s.update(ensembles={"e": {"members": "s0"}}), "'ensembles' must map"),
], ids=["val-string", "test-bool", "val-percent", "set-string", "names-repeat", "no-preset", "job-not-planned",
        "params-string", "ensemble-members"])
def test_a_damaged_summary_is_one_line_naming_the_field(tmp_path, capsys, change, says):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(damaged(change)))
    assert load_script("report_runs").main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"report_runs: error: '{path}' is not a readable summary") and says in err, err
    assert "\n" not in err


def test_a_deeply_nested_summary_is_one_line(tmp_path, capsys):
    path = tmp_path / "summary.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    assert load_script("report_runs").main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "nested too deeply" in err and "\n" not in err
