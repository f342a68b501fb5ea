"""`fervit export`: ONNX files with a dynamic batch that ONNX Runtime runs like PyTorch on real faces."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra")
pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra")

from fervit.cli import main  # noqa: E402
from fervit.data.images import normalize  # noqa: E402
from fervit.inference.onnx import (PROB_ATOL, ParityReport, check_parity, export_onnx, load_onnx,  # noqa: E402
                                   real_test_slice)
from fervit.model_file import ModelFile
from fervit.models.checkpoint import load_model  # noqa: E402
from test_predict import FACES, make_checkpoint  # noqa: E402

# fixtures that take over 5 s to build: conftest marks every test that needs one slow
SLOW_FIXTURES = {"exported"}


@pytest.fixture(scope="module")
def exported(real_data, tmp_path_factory):
    """A tiny vit_cnn run folder after `fervit export RUN --check-images 256`: (run, onnx path, printed output)."""
    run = make_checkpoint(tmp_path_factory.mktemp("runs") / "tiny")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["export", str(run), "--data", str(real_data), "--check-images", "256"])
    assert code == 0
    return run, run / "best_model.onnx", printed.getvalue()


def test_export_writes_onnx_beside_the_checkpoint_and_reports_its_check(exported):
    run, path, printed = exported
    assert path.is_file() and f"wrote {path}" in printed
    assert "check: 256 test faces" in printed and "0 predictions differ" in printed


@pytest.mark.slow
def test_onnx_runtime_agrees_with_pytorch_on_real_test_faces(exported, real_data):
    run, path, _ = exported
    model, meta = load_model(run)
    classifier, _ = load_onnx(path)
    images, labels = real_test_slice(real_data, 300)
    report = check_parity(model, classifier, images, labels, meta)
    assert report.max_prob_diff <= PROB_ATOL
    assert report.onnx_accuracy == report.torch_accuracy
    assert report.disagreements == 0


@pytest.mark.slow
def test_the_patch_model_exports_too(real_data, tmp_path):
    run = make_checkpoint(tmp_path / "patch", name="vit_patch")
    model, meta = load_model(run)
    path = export_onnx(model, meta, tmp_path / "patch.onnx")
    classifier, _ = load_onnx(path)
    images, labels = real_test_slice(real_data, 64)
    report = check_parity(model, classifier, images, labels, meta)
    assert report.ok, report.summary()


def test_batch_size_is_dynamic(exported):
    run, path, _ = exported
    model, _ = load_model(run)
    classifier, _ = load_onnx(path)
    for batch in (1, 5, 33):
        x = normalize(torch.randint(0, 256, (batch, 48, 48), dtype=torch.uint8))
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(classifier(x.numpy()), expected, atol=1e-4)


def test_the_onnx_file_carries_the_model_description(exported):
    run, path, _ = exported
    _, meta = load_onnx(path)
    assert meta == ModelFile.read(run / "best_model.safetensors")


def test_predict_with_the_onnx_backend_matches_pytorch(exported, real_data, capsys):
    run, _, _ = exported
    face = real_data / "test" / FACES[0][0]
    outputs = {}
    for backend in ("torch", "onnx"):
        assert main(["predict", "--json", str(face), "--model", str(run), "--backend", backend]) == 0
        outputs[backend] = json.loads(capsys.readouterr().out)[0]["faces"][0]["probabilities"]
    for name, p in outputs["torch"].items():
        assert outputs["onnx"][name] == pytest.approx(p, abs=PROB_ATOL)


def test_export_refuses_a_parity_failure_with_one_clear_error(exported, real_data, tmp_path, capsys, monkeypatch):
    run, path, _ = exported
    monkeypatch.setattr("fervit.inference.onnx.export_onnx", lambda model, meta, out: shutil.copy(path, out))
    monkeypatch.setattr("fervit.inference.onnx.check_parity", lambda *a: ParityReport(8, 0.5, 3.0, 0.5, 0.25, 2))
    assert main(["export", str(run), "--output", str(tmp_path / "m.onnx"), "--data", str(real_data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "disagrees with PyTorch" in err and "\n" not in err
    assert not (tmp_path / "m.onnx").exists()  # an export that failed its check is not left for --backend onnx


def test_a_check_that_crashes_leaves_no_unchecked_export(exported, real_data, tmp_path, capsys, monkeypatch):
    # issue 21: a model whose input did not fit the test faces crashed the check and left its .onnx behind
    run, path, _ = exported
    monkeypatch.setattr("fervit.inference.onnx.export_onnx", lambda model, meta, out: shutil.copy(path, out))

    def crash(*a):
        raise RuntimeError("shape mismatch: expected 24x24 input")

    monkeypatch.setattr("fervit.inference.onnx.check_parity", crash)
    assert main(["export", str(run), "--output", str(tmp_path / "m.onnx"), "--data", str(real_data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not be checked against PyTorch (RuntimeError: shape mismatch" in err and "\n" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_export_without_data_reads_nothing_and_writes_nothing(exported, tmp_path, capsys):
    run, _, _ = exported
    assert main(["export", str(run), "--output", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "none")]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    assert not (tmp_path / "m.onnx").exists()


def test_a_damaged_onnx_file_is_one_clear_error(exported, real_data, tmp_path, capsys):
    _, path, _ = exported
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[:2000])
    assert main(["predict", str(real_data / "test" / FACES[0][0]), "--model", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fervit: error:") and "not a loadable ONNX model" in err and "\n" not in err


def test_an_onnx_file_from_elsewhere_is_one_clear_error(tmp_path, real_data, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 48, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 48, 48])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), foreign)
    assert main(["predict", str(real_data / "test" / FACES[0][0]), "--model", str(foreign)]) == 2
    assert "was not written by `fervit export`" in capsys.readouterr().err


def test_calibrating_keeps_the_onnx_export_in_step_and_both_backends_return_calibrated_probabilities(
        exported, real_data, tmp_path, capsys):
    from fervit.evaluation.calibration import calibrate_run
    from test_calibration import overconfident

    run, _, _ = exported
    copy = tmp_path / "run"
    shutil.copytree(run, copy)  # the module's run stays uncalibrated for the other tests
    _, sharp, labels = overconfident(n=500)
    section = calibrate_run(copy, copy / "best_model.safetensors", {"logits": sharp, "labels": labels},
                            {"logits": sharp, "labels": labels})
    assert section["temperature"] > 2
    _, meta = load_onnx(copy / "best_model.onnx")
    assert meta.temperature == section["temperature"]  # the export's metadata was rewritten, its graph not
    model, _ = load_model(copy)
    images, labels = real_test_slice(real_data, 64)
    assert check_parity(model, load_onnx(copy / "best_model.onnx")[0], images, labels, meta).ok  # raw logits agree
    face = real_data / "test" / FACES[0][0]
    outputs = {}
    for backend, where in (("torch", copy), ("onnx", copy), ("plain", run)):
        assert main(["predict", "--json", str(face), "--model", str(where),
                     "--backend", "torch" if backend == "plain" else backend]) == 0
        outputs[backend] = json.loads(capsys.readouterr().out)[0]["faces"][0]
    assert outputs["onnx"]["emotion"] == outputs["torch"]["emotion"] == outputs["plain"]["emotion"]
    for name, p in outputs["torch"]["probabilities"].items():
        assert outputs["onnx"]["probabilities"][name] == pytest.approx(p, abs=PROB_ATOL)
    top = outputs["plain"]["emotion"]
    assert outputs["torch"]["probabilities"][top] < outputs["plain"]["probabilities"][top]  # T > 1 softens
