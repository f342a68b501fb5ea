"""Calibrated probabilities: temperature scaling fitted on validation logits, stored in the model file, used
by predict/serve (and the ONNX path), fitted after training and by `fervit evaluate --calibrate`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import save_tiny_checkpoint, tiny_run_config
from PIL import Image

from fervit.cli import main
from fervit.errors import FervitError
from fervit.evaluation.calibration import ece, fit_temperature, nll, reliability
from fervit.inference.predictor import Predictor
from fervit.model_file import ModelFile
from fervit.models.checkpoint import load_model


def overconfident(n: int = 4000, sharpen: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z) (so z is calibrated), and z * sharpen: the same argmax, over-confident."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 7, generator=gen) * 1.5
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(1)
    return z, z * sharpen, labels


def set_temperature(weights, t) -> None:
    meta = json.loads(weights.with_suffix(".json").read_text())
    meta["temperature"] = t
    weights.with_suffix(".json").write_text(json.dumps(meta))


def test_fitted_temperature_undoes_over_confidence_and_lowers_ece():
    calibrated, sharp, labels = overconfident()
    t = fit_temperature(sharp, labels)
    assert 2.6 < t < 3.4  # the logits were sharpened 3x
    assert nll(sharp, labels, t) < nll(sharp, labels)
    before, after = ece(sharp, labels), ece(sharp, labels, t)
    assert before > 0.15 and after < 0.04 and after < before
    assert after == pytest.approx(ece(calibrated, labels), abs=0.02)


def test_under_confident_logits_get_a_temperature_below_one():
    _, sharp, labels = overconfident(sharpen=0.4)
    assert fit_temperature(sharp, labels) < 0.6


def test_ece_is_the_count_weighted_gap_between_confidence_and_accuracy_per_bin():
    # 10 faces at confidence 0.9 of which 6 are right, 10 at ~0.5 of which 5 are right: ECE = (0.3 + 0) / 2
    high = torch.tensor([[math.log(9.0), 0.0]])  # softmax -> 0.9, 0.1
    low = torch.tensor([[0.0, -1e-9]])  # ~0.5: in the bin (7/15, 8/15]
    logits = torch.cat([high.repeat(10, 1), low.repeat(10, 1)])
    labels = torch.tensor([0] * 6 + [1] * 4 + [0] * 5 + [1] * 5)
    r = reliability(logits, labels, bins=15)
    assert r["ece"] == pytest.approx(0.15, abs=1e-6)
    assert sum(r["count"]) == 20 and r["count"][13] == 10 and r["count"][7] == 10  # 0.9 is in (13/15, 14/15]
    assert r["accuracy"][13] == pytest.approx(0.6)


def test_nothing_to_fit_on_keeps_temperature_one():
    assert fit_temperature(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long)) == 1.0
    assert fit_temperature(torch.full((4, 7), float("nan")), torch.zeros(4, dtype=torch.long)) == 1.0


def test_a_model_file_without_temperature_loads_with_t_one_and_a_stored_one_round_trips(tmp_path):
    weights = save_tiny_checkpoint(tmp_path / "run")
    assert "temperature" not in json.loads(weights.with_suffix(".json").read_text())  # as every older file
    assert ModelFile.read(weights).temperature == 1.0
    set_temperature(weights, 1.7)
    assert load_model(weights)[1].temperature == 1.7
    assert ModelFile.from_dict(ModelFile.read(weights).to_dict(), "again").temperature == 1.7


@pytest.mark.parametrize("bad", [0, -1.5, "warm", True, None])
def test_a_bad_stored_temperature_is_one_clear_error(tmp_path, bad):
    weights = save_tiny_checkpoint(tmp_path / "run")
    set_temperature(weights, bad)
    with pytest.raises(FervitError, match="damaged model description .*temperature must be a positive number"):
        ModelFile.read(weights)


def faces(real_data, n: int = 6) -> list[tuple[str, Image.Image]]:
    paths = sorted((real_data / "test" / "happy").glob("*.jpg"))[:n]
    return [(p.name, Image.open(p)) for p in paths]


def test_predicted_probabilities_follow_the_temperature_and_the_label_does_not(real_data, tmp_path):
    weights = save_tiny_checkpoint(tmp_path / "run", seed=3)
    plain = Predictor.load(weights).predict_images(faces(real_data), detect="never")
    set_temperature(weights, 4.0)
    soft = Predictor.load(weights).predict_images(faces(real_data), detect="never")
    for a, b in zip(plain, soft):
        pa, pb = a.faces[0].probabilities, b.faces[0].probabilities
        assert a.faces[0].emotion == b.faces[0].emotion
        assert max(pb.values()) < max(pa.values())  # softer
        assert sum(pb.values()) == pytest.approx(1.0, abs=1e-5)
        # exactly softmax(logits / 4): log-probabilities shrink by 4 up to a constant
        la, lb = np.log(list(pa.values())), np.log(list(pb.values()))
        np.testing.assert_allclose(lb - lb.mean(), (la - la.mean()) / 4.0, atol=1e-4)


def test_predict_json_reports_calibrated_probabilities(capsys, real_data, tmp_path):
    weights = save_tiny_checkpoint(tmp_path / "run", seed=3)
    face = sorted((real_data / "test" / "sad").glob("*.jpg"))[0]

    def top():
        assert main(["predict", "--json", str(face), "--model", str(weights)]) == 0
        f = json.loads(capsys.readouterr().out)[0]["faces"][0]
        return f["emotion"], f["probabilities"][f["emotion"]]

    label, p_plain = top()
    set_temperature(weights, 0.5)  # sharper
    label_sharp, p_sharp = top()
    assert label_sharp == label and p_sharp > p_plain


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A two-epoch tiny run on a synthetic fer2013 layout (PublicTest is its validation split)."""
    from conftest import make_layout

    from fervit.training.trainer import train

    tmp = tmp_path_factory.mktemp("calibrated")
    root = make_layout(tmp / "fer", per_class=6)
    cfg = tiny_run_config("data.protocol=fer2013", "train.epochs=2", root=root, output=tmp / "runs")
    return train(cfg, quiet=True), root


def test_training_fits_the_temperature_on_validation_and_reports_ece_before_and_after(trained_run):
    run, _ = trained_run
    results = json.loads((run / "results.json").read_text())
    cal = results["calibration"]
    t = cal["temperature"]
    assert ModelFile.read(run / "best_model.safetensors").temperature == pytest.approx(t)
    assert cal["fitted_on"] == "val" and cal["bins"] == 15
    for split in ("val", "test"):
        assert cal[split]["images"] == results["split_sizes"][split]
        assert 0 <= cal[split]["ece_after"] <= 1 and 0 <= cal[split]["ece_before"] <= 1
    assert cal["val"]["nll_after"] <= cal["val"]["nll_before"] + 1e-9  # T minimises the validation NLL
    with Image.open(run / cal["figure"]) as im:
        assert im.format == "PNG" and im.width > 500


def test_evaluate_calibrate_writes_the_temperature_into_an_old_runs_model_file(capsys, trained_run):
    run, root = trained_run
    weights = run / "best_model.safetensors"
    fitted = ModelFile.read(weights).temperature
    meta = json.loads(weights.with_suffix(".json").read_text())
    meta.pop("temperature")  # a run trained before calibration existed
    weights.with_suffix(".json").write_text(json.dumps(meta))
    results = json.loads((run / "results.json").read_text())
    results.pop("calibration")
    (run / "results.json").write_text(json.dumps(results))
    (run / "reliability_diagram.png").unlink()

    assert main(["evaluate", str(run), "--calibrate", "--data", str(root), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "calibration: temperature" in out and "best_model.json" in out
    assert ModelFile.read(weights).temperature == pytest.approx(fitted, rel=1e-6)  # the same fit as training's
    cal = json.loads((run / "results.json").read_text())["calibration"]
    assert cal["temperature"] == pytest.approx(fitted, rel=1e-6) and {"val", "test"} <= set(cal)
    assert (run / "reliability_diagram.png").is_file()


def test_evaluate_calibrate_of_an_ensemble_or_the_shipped_model_is_one_clear_error(capsys, tmp_path, monkeypatch):
    a, b = save_tiny_checkpoint(tmp_path / "a"), save_tiny_checkpoint(tmp_path / "b")
    assert main(["evaluate", str(a), str(b), "--calibrate", "--output", str(tmp_path / "o")]) == 2
    assert "give a single checkpoint" in capsys.readouterr().err
    monkeypatch.setattr("fervit.inference.predictor.shipped_model", lambda: a)
    assert main(["evaluate", str(a), "--calibrate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "shipped model is part of the installed package" in err and "\n" not in err


def test_serve_returns_calibrated_probabilities_and_reports_the_temperature(real_data, tmp_path):
    pytest.importorskip("fastapi", reason="the server needs the serve extra")
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    from fastapi.testclient import TestClient

    from fervit.serve.app import create_app

    weights = save_tiny_checkpoint(tmp_path / "run", seed=3)
    face = sorted((real_data / "test" / "angry").glob("*.jpg"))[0]
    [raw] = Predictor.load(weights).predict_images([("f", Image.open(face))])
    set_temperature(weights, 4.0)
    with TestClient(create_app(Predictor.load(weights))) as client:
        health = client.get("/health").json()
        [served] = client.post("/predict", files={"file": ("f.jpg", face.read_bytes(), "image/jpeg")}).json()["faces"]
    assert health["temperature"] == 4.0
    assert served["emotion"] == raw.faces[0].emotion
    assert served["probabilities"][served["emotion"]] < raw.faces[0].probabilities[served["emotion"]]
    la = np.log(list(raw.faces[0].probabilities.values()))
    lb = np.log(list(served["probabilities"].values()))
    np.testing.assert_allclose(lb - lb.mean(), (la - la.mean()) / 4.0, atol=1e-3)
