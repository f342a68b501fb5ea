"""Mistakes a user can make end in one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import save_tiny_checkpoint, tiny_model, tiny_model_config

from fervit.errors import FervitError
from fervit.models.checkpoint import load_model


def fervit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fervit", *args], capture_output=True, text=True, timeout=120, **kw)


def assert_one_line_error(done, pattern):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fervit: error: "), done.stderr
    assert "Traceback" not in done.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.e2e
@pytest.mark.parametrize("args,pattern", [
    (["train", "--data", "/no/such/folder", "--device", "cpu"], "does not exist"),
    (["train", "--preset", "nope"], "no preset 'nope'"),
    (["train", "--set", "model.depth=deep"], "expects a int"),
    (["evaluate", "/no/such/run"], "does not exist"),
    (["runs", "/no/such/runs"], "no run folder"),
    (["data", "audit", "/no/such/folder"], "does not exist"),
])
def test_cli_bad_input_is_one_line(args, pattern):
    assert_one_line_error(fervit(*args), pattern)


@pytest.mark.e2e
def test_train_on_a_folder_with_an_unknown_class(tmp_path):
    (tmp_path / "train" / "contempt").mkdir(parents=True)
    assert_one_line_error(fervit("train", "--data", str(tmp_path), "--device", "cpu"), "unknown class folder")


@pytest.mark.e2e
def test_missing_default_data_folder_points_to_fetch(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "FERVIT_DATA"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")  # no fetched copy either
    (tmp_path / "clone").mkdir()
    done = fervit("train", "--preset", "tiny", "--device", "cpu", cwd=tmp_path / "clone", env=env)
    assert_one_line_error(done, "no FER-2013 data found")
    assert "fervit data fetch" in done.stderr and "shared/data/emotion_detection_fer" in done.stderr


@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny_checkpoint(tmp_path)


def test_checkpoint_round_trip_gives_back_every_tensor_and_the_description(checkpoint):
    model, meta = load_model(checkpoint)
    saved = tiny_model().state_dict()  # the same seed builds the same weights
    assert set(model.state_dict()) == set(saved)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert meta.model == tiny_model_config() and not model.training


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FervitError, match="never loads pickled"):
        load_model(tmp_path / "model.pt")


def test_damaged_checkpoint_is_one_clear_error(checkpoint):
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(FervitError, match="damaged or not a safetensors file"):
        load_model(checkpoint)


def test_checkpoint_of_another_architecture_is_named(checkpoint):
    meta_path = checkpoint.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["model"]["embed_dim"] = 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FervitError, match="does not match a vit_cnn model"):
        load_model(checkpoint)


def test_missing_sidecar_is_named(checkpoint):
    checkpoint.with_suffix(".json").unlink()
    with pytest.raises(FervitError, match="best_model.json' is missing"):
        load_model(checkpoint)


@pytest.mark.e2e
def test_cli_evaluate_with_a_damaged_checkpoint(checkpoint):
    checkpoint.write_bytes(b"garbage")
    assert_one_line_error(fervit("evaluate", str(checkpoint.parent)), "damaged")


def test_incomplete_model_description_is_named(checkpoint):
    meta_path = checkpoint.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["model"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FervitError, match="incomplete model description \\(missing 'model'\\)"):
        load_model(checkpoint)


@pytest.mark.e2e
def test_cli_evaluate_with_a_damaged_run_config(checkpoint):
    (checkpoint.parent / "config.json").write_text("{not json")
    assert_one_line_error(fervit("evaluate", str(checkpoint.parent)), "config.json is damaged")


@pytest.mark.parametrize("setting", ["optim.lr=nan", "optim.lr=inf", "optim.weight_decay=nan", "model.depth=-1",
                                     "model.num_classes=8", "model.img_size=24", "model.in_chans=3",
                                     "train.threads=-1", "augment.brightness=10"])
def test_train_refuses_a_meaningless_value_before_anything_is_written(setting, tiny_layout, tmp_path, capsys):
    # issue 21: these trained an epoch first (or trained a model nothing could use); now the config refuses them
    from fervit.cli import main

    assert main(["train", "--preset", "tiny", "--data", str(tiny_layout), "--output", str(tmp_path / "runs"),
                 "--device", "cpu", "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fervit: error: config key '{setting.split('=')[0]}'") and "\n" not in err
    assert not (tmp_path / "runs").exists()
