"""The model that ships inside the package (src/fervit/assets/, built by scripts/ship_model.py).

Its full accuracy is a benchmark number (MODEL_CARD.md, RESULTS.md); here it must load, be small, be the
default for predict and evaluate, and classify real held-out faces far above chance (1/7).
"""

from __future__ import annotations

from dataclasses import asdict
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from fervit.config import load_preset
from fervit.data.images import normalize
from fervit.data.dataset import load_fer
from fervit.inference.predictor import shipped_model
from fervit.models import model_names
from fervit.models.checkpoint import load_model


@pytest.fixture(scope="module")
def shipped():
    path = shipped_model()
    assert path is not None, "src/fervit/assets/model.safetensors is missing; build it with scripts/ship_model.py"
    return path


def test_it_is_small_fp16_and_described(shipped):
    assert shipped.stat().st_size <= 10 * 1024 * 1024
    with safe_open(str(shipped), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    meta = json.loads(shipped.with_suffix(".json").read_text())
    assert meta["model"]["name"] in model_names() and meta["split"]["protocol"] == "fer2013"
    card = (shipped.parent / "MODEL_CARD.md").read_text()
    assert f"**{100 * meta['metrics']['test_accuracy']:.1f}%**" in card  # the card reports the file's own numbers
    assert (shipped.parent / "confusion_matrix.png").stat().st_size > 10_000


def test_it_classifies_all_private_test_faces_better_than_the_model_it_replaced(shipped, real_data):
    data = load_fer(real_data, progress=False)
    idx = torch.nonzero(data.usage == 3).flatten()  # all 3,589 PrivateTest faces
    model, _ = load_model(shipped)
    with torch.no_grad():
        preds = torch.cat([model(normalize(data.images[idx[i:i + 512]])).argmax(1) for i in range(0, len(idx), 512)])
    accuracy = (preds == data.labels[idx]).float().mean().item()
    # the shipped model (cpu_cnn with self-distillation on 44 px crops, cpu_sd_c44) scores 70.7% here; the one it
    # replaced (the same on 40 px crops, cpu_sd) 69.2%, which fails
    assert accuracy >= 0.700, f"{accuracy:.1%} on {len(idx)} PrivateTest faces"
    assert len(set(preds.tolist())) == 7  # every class is predicted, "disgusted" included


def test_its_onnx_export_is_the_same_model_and_the_default_on_a_cpu(shipped, real_data):
    """assets/model.onnx carries the same description and gives the same probabilities as the safetensors
    weights, and backend auto picks it (ONNX Runtime) for the shipped model; --backend torch still gets PyTorch."""
    pytest.importorskip("onnxruntime")
    from fervit.inference.predictor import Predictor

    onnx_path = shipped.with_suffix(".onnx")
    auto, torch_ = Predictor.load(backend="auto"), Predictor.load(backend="torch")
    assert (auto.backend, auto.source) == ("onnx", onnx_path)
    assert (torch_.backend, torch_.source) == ("torch", shipped)
    assert auto.meta.to_dict() == torch_.meta.to_dict()  # one description, one temperature
    data = load_fer(real_data, progress=False)
    faces = data.images[torch.nonzero(data.usage == 3).flatten()[:256]].numpy()
    for tta in ("none", "ten_crop"):
        auto.tta = torch_.tta = tta
        p_onnx, p_torch = auto.classify(faces), torch_.classify(faces)
        assert abs(p_onnx - p_torch).max() < 1e-4, tta
        assert (p_onnx.argmax(1) == p_torch.argmax(1)).all()


def test_without_onnxruntime_the_shipped_model_runs_on_pytorch(shipped, monkeypatch):
    from fervit.inference.predictor import Predictor

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    predictor = Predictor.load()
    assert (predictor.backend, predictor.source) == ("torch", shipped)


@pytest.mark.slow
@pytest.mark.e2e
def test_predict_and_evaluate_use_it_without_a_model_argument(shipped, real_data, tmp_path):
    meta = json.loads(shipped.with_suffix(".json").read_text())
    face = next((real_data / "test" / "happy").iterdir())
    done = subprocess.run([sys.executable, "-m", "fervit", "predict", str(face), "--json", "--no-detect"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)
    done = subprocess.run([sys.executable, "-m", "fervit", "evaluate", "--data", str(real_data)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "runs" / "shipped_model" / "results.json").read_text())
    assert results["test"]["num_samples"] == 3589  # PrivateTest, from the split recorded in model.json
    # the card's figure, up to the precision evaluate picks on this CPU (bf16 autocast where the CPU has it,
    # fp32 elsewhere: a few of 3,589 faces may change their answer, 0.1 point)
    assert results["test"]["accuracy"] == pytest.approx(meta["metrics"]["test_accuracy"], abs=3e-3)
    assert not (shipped.parent / "results.json").exists()  # nothing written into the package


def test_the_cpu_cnn_preset_is_the_shipped_models_recipe(shipped):
    # `fervit train` on a CPU trains cpu_cnn, and the README says it reproduces the shipped model: the preset's
    # model, augmentation, optimiser, epochs and time budget must be the ones the shipped run trained with (only
    # paths, the protocol and the thread count may differ)
    trained = load_preset(str(shipped.parent / "train_config.json"))
    preset = load_preset("cpu_cnn")
    for section in ("model", "augment", "optim"):
        assert asdict(getattr(preset, section)) == asdict(getattr(trained, section)), section
    for field in ("epochs", "batch_size", "time_budget_s"):
        assert getattr(preset.train, field) == getattr(trained.train, field), field
