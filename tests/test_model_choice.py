"""Which model answers: `--model last` is the newest finished run, every command that loads a model names it in
one line on stderr, and a file that is not a model (config.json) says what to give instead."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny_checkpoint
from PIL import Image

from fervit.cli import main
from fervit.errors import FervitError
from fervit.inference.predictor import newest_finished_run, resolve_model


def finished_run(path: Path, test_acc: float, when: float) -> Path:
    """A run folder as `fervit train` leaves it: weights, metrics and results.json, last written at `when`."""
    weights = save_tiny_checkpoint(path)
    meta = json.loads(weights.with_suffix(".json").read_text())
    weights.with_suffix(".json").write_text(json.dumps({**meta, "epoch": 3, "val_acc": 0.41}))
    (path / "training_metrics.csv").write_text("epoch,lr\n1,0.1\n")
    (path / "results.json").write_text(json.dumps({"test": {"accuracy": test_acc}}))
    for f in path.iterdir():
        os.utime(f, (when, when))
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    finished_run(root / "old", 0.30, 1e9)
    newest = finished_run(root / "group" / "new", 0.43, 2e9)  # --seeds/--jobs runs sit one level deeper
    save_tiny_checkpoint(root / "unfinished")  # training now: a best model but no results.json
    (root / "shipped_model").mkdir()  # `fervit evaluate` of the shipped model: results but no weights
    (root / "shipped_model" / "results.json").write_text("{}")
    os.utime(root / "old" / "results.json", (3e9, 3e9))  # evaluated again later: still not the newest run
    return root, newest


def test_last_is_the_newest_finished_run(runs):
    root, newest = runs
    assert newest_finished_run(root) == newest
    assert resolve_model("last", root) == newest
    assert resolve_model("some/folder", root) == Path("some/folder")


def test_last_without_a_finished_run_is_one_line(tmp_path):
    with pytest.raises(FervitError, match="no finished run under") as e:
        resolve_model("last", tmp_path / "runs")
    assert "\n" not in str(e.value)


def test_predict_names_the_model_on_stderr_and_keeps_json_clean(runs, tmp_path, capsys):
    root, newest = runs
    face = tmp_path / "face.png"
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(face)
    assert main(["predict", str(face), "--model", "last", "--runs", str(root), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["faces"]  # stdout is only the JSON
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(newest / "best_model.safetensors") in lines[0]
    assert "epoch 3" in lines[0] and "val acc 41.0%" in lines[0] and "test acc 43.0%" in lines[0]


@pytest.mark.slow
@pytest.mark.e2e
def test_evaluate_and_export_name_the_model(runs, tmp_path):
    from conftest import make_layout

    root, newest = runs
    data = make_layout(tmp_path / "fer", per_class=2)
    for args in (["evaluate", "last", "--runs", str(root), "--data", str(data), "--device", "cpu"],
                 ["export", "last", "--runs", str(root), "--check-images", "0"]):
        done = subprocess.run([sys.executable, "-m", "fervit", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"fervit: model {newest / 'best_model.safetensors'} (vit_cnn, epoch 3" in done.stderr
        assert "fervit: model" not in done.stdout


@pytest.mark.parametrize("given,says", [("config.json", "give the run folder"),
                                        ("best_model.json", "best_model.safetensors' (its weights)")])
def test_a_json_file_as_model_says_what_to_give_instead(runs, capsys, given, says):
    root, newest = runs
    (newest / "config.json").write_text("{}")
    assert main(["predict", "-", "--model", str(newest / given)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a JSON file, not a model" in err and says in err
    assert "pickle" not in err


@pytest.mark.slow
@pytest.mark.e2e
def test_serve_on_a_busy_port_is_one_line_before_serving(runs):
    pytest.importorskip("uvicorn", reason="the server needs the serve extra")
    root, newest = runs
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "fervit", "serve", "--model", str(newest), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "serving" not in done.stdout
    assert done.stderr.strip() == (f"fervit: error: port {port} on 127.0.0.1 is already in use (another `fervit "
                                   "serve`?); stop that server or pick another port with --port N")


def test_serve_refuses_a_port_out_of_range(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "70000"])
    assert e.value.code == 2 and "must be a port number from 0" in capsys.readouterr().err
