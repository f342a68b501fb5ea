"""Damaged files in a run folder (training_metrics.csv, results.json) end in a warning naming them, never a
traceback, and what can still be done is done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fervit.cli import main
from fervit.errors import FervitError
from fervit.run_folder import read_metrics_csv
from test_predict import make_checkpoint


@pytest.fixture
def run(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "runs" / "run")


@pytest.mark.parametrize("content, detail", [
    ("epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds\n1,0.1,1.9,0.2,1.8,\x00zz,3\n", "line 2: could not convert"),
    ("epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds\n1,0.1,1.9\n", "line 2: float() argument"),
    ("\xff\xfe garbage", "can't decode byte 0xff"),
    ("step,loss\n1,2\n", "its header is ['step', 'loss'], expected epoch,"),
], ids=["bad-number", "short-row", "not-utf8", "wrong-header"])
def test_a_damaged_metrics_csv_is_one_line_naming_it(tmp_path, content, detail):
    path = tmp_path / "training_metrics.csv"
    path.write_text(content, encoding="latin-1")
    with pytest.raises(FervitError, match="training_metrics.csv' is damaged") as err:
        read_metrics_csv(path)
    assert detail in str(err.value)


def test_evaluate_writes_results_despite_a_damaged_metrics_csv_and_a_list_results_json(run, tiny_layout, capsys):
    (run / "training_metrics.csv").write_bytes(b"\x00\x01binary\xff")
    (run / "results.json").write_text("[1, 2, 3]")
    with pytest.warns(UserWarning) as record:
        code = main(["evaluate", str(run), "--data", str(tiny_layout), "--device", "cpu"])
    messages = [str(w.message) for w in record]
    assert code == 0
    assert any("results.json' was damaged or not a fervit results file; it is rewritten" in m for m in messages)
    assert any("training_metrics.csv' is damaged" in m and "curves are not drawn" in m for m in messages)
    test = json.loads((run / "results.json").read_text())["test"]  # a whole results file, rewritten
    assert test["num_samples"] == 56 == sum(map(sum, test["confusion_matrix"]))  # seed protocol: the test/ folder
    assert test["accuracy"] == pytest.approx(sum(row[i] for i, row in enumerate(test["confusion_matrix"])) / 56)
    assert f"accuracy {test['accuracy']:.4f}" in capsys.readouterr().out


def test_runs_leaves_out_a_run_whose_results_json_is_a_list(run, tmp_path, capsys):
    (run / "results.json").write_text("[]")
    good = make_checkpoint(tmp_path / "runs" / "good")
    (good / "results.json").write_text(json.dumps({"model": "vit_cnn", "best_val_acc": 0.5}))
    with pytest.warns(UserWarning, match=f"left out {run}: its results.json is damaged"):
        assert main(["runs", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 and table[1].startswith("good ") and "50.00%" in table[1]
