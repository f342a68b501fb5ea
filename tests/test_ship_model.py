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
def ship():
    spec = importlib.util.spec_from_file_location("ship_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tiny_run(layout, tmp_path, protocol):
    cfg = tiny_run_config(f"data.protocol={protocol}", "train.epochs=1", "data.val_fraction=0.5",  # seed needs a val
                          root=layout, output=tmp_path / "runs")
    return train(cfg, quiet=True)


def test_a_fer2013_run_is_packaged_in_fp16_with_its_own_numbers(ship, tiny_layout, tmp_path, capsys):
    run = tiny_run(tiny_layout, tmp_path, "fer2013")
    dest = tmp_path / "assets"
    assert ship([str(run), "--dest", str(dest), "--data", str(tiny_layout)]) == 0
    for name in ("model.safetensors", "model.json", "MODEL_CARD.md", "confusion_matrix.png", "train_config.json"):
        assert (dest / name).stat().st_size > 0, name
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys() if f.get_tensor(k).is_floating_point())
    meta = json.loads((dest / "model.json").read_text())
    assert meta["split"]["protocol"] == "fer2013" and meta["source_run"] == run.name
    assert f"**{100 * meta['metrics']['test_accuracy']:.1f}%**" in (dest / "MODEL_CARD.md").read_text()
    assert "shipped" in capsys.readouterr().out


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
