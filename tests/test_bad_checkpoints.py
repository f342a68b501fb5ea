"""Crafted and damaged checkpoints are refused with one line naming the file, before anything large is
allocated; a full disk while saving is one line too, and leaves no half-written file."""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fervit.io
from fervit.cli import main
from fervit.config import ModelConfig
from fervit.errors import FervitError
from fervit.models import build_model
from fervit.models.checkpoint import describe, load_model, save_model
from conftest import make_layout
from test_predict import make_checkpoint


@pytest.fixture
def run(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "run")


def weights(run: Path) -> Path:
    return run / "best_model.safetensors"


def edit_description(run: Path, change) -> None:
    path = weights(run).with_suffix(".json")
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def edit_weights(run: Path, change) -> None:
    state = load_file(weights(run))
    save_file({k: change(k, v) for k, v in state.items()}, weights(run))


def test_integer_weights_are_refused(run):
    edit_weights(run, lambda k, v: v.round().to(torch.int32) if v.is_floating_point() else v)
    with pytest.raises(FervitError, match=r"stores \S+ as I32; a model's weights are floating point"):
        load_model(run)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_infinite_weights_are_refused(run, bad):
    edit_weights(run, lambda k, v: v.index_fill(0, torch.tensor([0]), bad) if k == "encoder.head.0.weight" else v)
    with pytest.raises(FervitError, match="holds NaN or infinite values in encoder.head.0.weight; the model diverged"):
        load_model(run)


def test_a_classes_list_shorter_than_the_outputs_is_refused_by_predict_and_export(run, capsys):
    edit_description(run, lambda m: m.update(classes=["angry", "happy", "sad"]))
    assert main(["predict", str(run / "best_model.json"), "--model", str(run)]) == 2
    assert main(["export", str(run), "--check-images", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("names 3 classes but its model has 7 outputs" in line for line in lines)


def test_an_empty_stem_is_refused(run):
    edit_description(run, lambda m: m["model"].update(stem_channels=[]))
    with pytest.raises(FervitError, match=r"config key 'model.stem_channels' must be one or more channel counts"):
        load_model(run)


@pytest.mark.parametrize("change, message", [
    ({"embed_dim": 100_000, "mlp_dim": 400_000, "head_hidden": 100_000}, r"shape of \S+ is \(\d+, \d+\), expected"),
    ({"depth": 10**9}, r"holds \d+ tensors, too few for the depth-1000000000 vit_cnn"),
], ids=["wide", "deep"])
def test_a_huge_model_description_is_refused_before_it_is_built(run, change, message):
    edit_description(run, lambda m: m["model"].update(change))  # built for real, these would need terabytes
    with pytest.raises(FervitError, match=message):
        load_model(run)


def test_a_binary_model_description_is_damaged(run):
    weights(run).with_suffix(".json").write_bytes(bytes(range(256)))
    with pytest.raises(FervitError, match=r"best_model.json' is damaged \(not valid JSON\)"):
        load_model(run)


def test_an_input_size_that_disagrees_with_the_model_is_refused_at_export(run, capsys):
    edit_description(run, lambda m: m["input"].update(size=64))
    assert main(["export", str(run), "--check-images", "0"]) == 2
    err = capsys.readouterr().err
    assert "says the input is 64 px but its model is built for 48 px images" in err and "Traceback" not in err


def test_an_img_size_other_than_the_data_is_refused_at_export(run, capsys):
    # FER-2013 faces are 48 px, so a model described for 64 px can be neither trained nor checked on them
    edit_description(run, lambda m: (m["model"].update(img_size=64), m["input"].update(size=64)))
    assert main(["export", str(run), "--check-images", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config key 'model.img_size' must be 48" in err and "\n" not in err
    assert not run.joinpath("best_model.onnx").exists()


@pytest.mark.parametrize("field, value, says", [
    ("std", 0, "input.std must be a finite number above 0"), ("std", -0.5, "input.std must be a finite number above 0"),
    ("std", "x", "input.std must be a finite number above 0"), ("mean", None, "input.mean must be a finite number"),
    ("channels", 3, "input.channels is 3 but its model takes 1"),
], ids=["zero", "negative", "string", "null-mean", "channels"])
def test_an_input_normalisation_that_means_nothing_is_refused(run, capsys, field, value, says):
    # std 0 divided every face by zero: the model evaluated to 14.29% and predicted "angry nan%"
    edit_description(run, lambda m: m["input"].update({field: value}))
    with pytest.raises(FervitError, match=re.escape(says)):
        load_model(run)
    assert main(["predict", str(run / "best_model.json"), "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


def test_save_model_refuses_nan_weights(tmp_path):
    cfg = ModelConfig(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, stem_channels=(8, 16), head_hidden=32)
    model = build_model(cfg)
    with torch.no_grad():
        model.encoder.head[0].weight.fill_(float("nan"))
    with pytest.raises(FervitError, match="holds NaN or infinite values in encoder.head.0.weight"):
        save_model(model, describe(cfg), tmp_path / "best_model.safetensors")
    assert list(tmp_path.iterdir()) == []


def disk_full_in(monkeypatch, thread_name: str | None = None) -> None:
    """Every fsync (in `thread_name` only, if given) fails as on a full disk."""
    fsync = os.fsync

    def full(fd):
        if thread_name is None or threading.current_thread().name == thread_name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(fervit.io.os, "fsync", full)


def test_a_full_disk_during_save_model_is_one_line_and_leaves_no_file(monkeypatch, tmp_path):
    cfg = ModelConfig(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, stem_channels=(8, 16), head_hidden=32)
    disk_full_in(monkeypatch)
    with pytest.raises(FervitError) as err:
        save_model(build_model(cfg), describe(cfg), tmp_path / "best_model.safetensors")
    assert str(err.value) == (f"no space left on the device to write '{tmp_path / 'best_model.safetensors'}' "
                              "(No space left on device); free some space (or pick another folder) and run again")
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_the_checkpoint_thread_is_one_line(monkeypatch, capsys, tmp_path):
    layout = make_layout(tmp_path / "fer", per_class=6)
    disk_full_in(monkeypatch, "fervit-checkpoint")
    code = main(["train", "--preset", "tiny", "--data", str(layout), "--output", str(tmp_path / "runs"),
                 "--device", "cpu", "--epochs", "1", "--quiet", "--set", "train.threads=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("fervit: error: no space left on the device to write '") and "/last/e0001" in err[-1]


def test_a_classes_list_is_checked_against_the_default_output_count_too(run):
    edit_description(run, lambda m: (m["model"].pop("num_classes"), m.update(classes=["angry", "happy", "sad"])))
    with pytest.raises(FervitError, match="names 3 classes but its model has 7 outputs"):
        load_model(run)
