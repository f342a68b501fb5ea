"""scripts/ship_model.py: a finished fer2013 run becomes the package's model, re-evaluated as shipped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import tiny_run_config
import torch
from safetensors import safe_open

from fervit.training.trainer import train

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ship_model.py"


@pytest.fixture(scope="module")
def ship_module():
    spec = importlib.util.spec_from_file_location("ship_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ship(ship_module):
    return ship_module.main


def tiny_run(layout, tmp_path, protocol):
    cfg = tiny_run_config(f"data.protocol={protocol}", "train.epochs=1", "data.val_fraction=0.5",  # seed needs a val
                          root=layout, output=tmp_path / "runs")
    return train(cfg, quiet=True)


def test_a_fer2013_run_is_packaged_in_fp16_with_its_own_numbers(ship, tiny_layout, tmp_path, capsys):
    run = tiny_run(tiny_layout, tmp_path, "fer2013")
    dest = tmp_path / "assets"
    assert ship([str(run), "--dest", str(dest), "--data", str(tiny_layout)]) == 0
    for name in ("model.safetensors", "model.json", "model.onnx", "MODEL_CARD.md", "confusion_matrix.png",
                 "train_config.json"):
        assert (dest / name).stat().st_size > 0, name
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys() if f.get_tensor(k).is_floating_point())
    meta = json.loads((dest / "model.json").read_text())
    assert meta["split"]["protocol"] == "fer2013" and meta["source_run"] == run.name
    card = (dest / "MODEL_CARD.md").read_text()
    assert f"**{100 * meta['metrics']['test_accuracy']:.1f}%**" in card
    assert "is below fervit's accuracy target" in card  # a 1-epoch toy run
    assert "shipped" in capsys.readouterr().out


def test_the_card_says_which_side_of_the_cpu_target_the_model_is_on(ship_module, tiny_layout, tmp_path):
    run = tiny_run(tiny_layout, tmp_path, "fer2013")  # one run; only the accuracy the card reads changes
    cfg, results, rows = ship_module.check_inputs(run)
    for accuracy, side in [(0.7072, "meets"), (0.6993, "is below")]:
        test = dict(results["test"], accuracy=accuracy)
        text = ship_module.card(run, cfg, results, results["val"], test, rows, 1000)
        assert f"It {side} fervit's accuracy target for a CPU-trained model (70%" in text, accuracy


def test_a_seed_protocol_run_is_refused_in_one_line(ship, tiny_layout, tmp_path, capsys):
    run = tiny_run(tiny_layout, tmp_path, "seed")
    assert ship([str(run), "--dest", str(tmp_path / "assets"), "--data", str(tiny_layout)]) == 2
    err = capsys.readouterr().err.strip()
    assert "used the seed protocol" in err and "\n" not in err
    assert not (tmp_path / "assets" / "model.safetensors").exists()


@pytest.mark.parametrize("damage", ["{not json", "[]"], ids=["damaged", "list"])
def test_a_run_whose_results_are_damaged_is_refused_in_one_line(ship, tiny_layout, tmp_path, capsys, damage):
    run = tiny_run(tiny_layout, tmp_path, "fer2013")
    (run / "results.json").write_text(damage)
    assert ship([str(run), "--dest", str(tmp_path / "assets"), "--data", str(tiny_layout)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ship_model: error:") and "results.json" in err and "\n" not in err
    assert not (tmp_path / "assets").exists()


@pytest.fixture(scope="module")
def shipped(ship, tmp_path_factory):
    """A finished fer2013 run and the model shipped from it: (run, dest, {file: bytes} of dest)."""
    from conftest import make_layout

    base = tmp_path_factory.mktemp("ship")
    layout = make_layout(base / "fer")
    run = tiny_run(layout, base, "fer2013")
    dest = base / "assets"
    assert ship([str(run), "--dest", str(dest), "--data", str(layout)]) == 0
    return run, layout, dest, {p.name: p.read_bytes() for p in dest.iterdir()}


def damage_results(**fields):
    def damage(run):
        results = json.loads((run / "results.json").read_text())
        results.update(fields)
        (run / "results.json").write_text(json.dumps(results))
    return damage


def write(name, text):
    return lambda run: (run / name).write_text(text)


# issue 21: each of these replaced model.safetensors, model.json, confusion_matrix.png and train_config.json of
# the shipped model and kept the old card
DAMAGES = {
    "metrics damaged": (write("training_metrics.csv", "epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds\n"
                                                     "1,x,1,1,1,1,1\n"), "training_metrics.csv' is damaged"),
    "metrics missing": (lambda run: (run / "training_metrics.csv").unlink(), "training_metrics.csv' is missing"),
    "metrics empty": (write("training_metrics.csv", "epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds\n"),
                      "holds no epochs"),
    "results {}": (write("results.json", "{}"), "'params' must be a int"),
    "params a string": (damage_results(params="many"), "'params' must be a int, got 'many'"),
    "split_sizes a list": (damage_results(split_sizes=[1, 2]), "'split_sizes' must be a dict"),
    "split size a string": (damage_results(split_sizes={"train": "a", "val": 1, "test": 1}), "split_sizes.train"),
    "wall_seconds a string": (damage_results(wall_seconds="long"), "'wall_seconds' must be a int or float"),
    "device a number": (damage_results(device=5), "'device' must be a str, got 5"),
    "best_epoch a string": (damage_results(best_epoch="3"), "'best_epoch' must be a int"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_run_is_refused_before_anything_in_dest_changes(ship, shipped, tmp_path, capsys, case):
    import shutil

    good_run, layout, good_dest, before = shipped
    run, dest = tmp_path / good_run.name, tmp_path / "assets"
    shutil.copytree(good_run, run)
    shutil.copytree(good_dest, dest)
    damage, says = DAMAGES[case]
    damage(run)
    assert ship([str(run), "--dest", str(dest), "--data", str(layout), "--provenance", "new card"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ship_model: error:") and says in err and "\n" not in err, err
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before  # all or nothing: nothing, no staging left


def test_a_dest_that_is_a_file_is_one_line(ship, shipped, tmp_path, capsys):
    run, layout, _, _ = shipped
    dest = tmp_path / "assets"
    dest.write_text("not a folder")
    assert ship([str(run), "--dest", str(dest), "--data", str(layout)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--dest" in err and "is a file" in err and "\n" not in err
    assert dest.read_text() == "not a folder"


def test_a_read_only_dest_is_one_line_and_left_as_it_was(ship, shipped, tmp_path, capsys, monkeypatch):
    import errno
    import shutil
    import tempfile

    run, layout, good_dest, before = shipped
    dest = tmp_path / "assets"
    shutil.copytree(good_dest, dest)

    def read_only(*args, **kwargs):  # what a read-only folder answers; chmod cannot show it, the tests run as root
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert ship([str(run), "--dest", str(dest), "--data", str(layout)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write into --dest" in err and "Permission denied" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
