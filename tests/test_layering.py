"""The layers import one way: serving never pulls in the trainer (nor DDP, resume or matplotlib)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fervit.inference", "fervit.inference.predictor", "fervit.inference.onnx",
                                    "fervit.serve", "fervit.serve.app", "fervit.evaluation.rerun"])
def test_serving_and_evaluation_import_no_training_module(module):
    if module == "fervit.serve.app":
        pytest.importorskip("fastapi")
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.startswith('fervit.training')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fervit.inference.predictor", "fervit.inference.onnx_runtime", "fervit.cli.predict",
                                    "fervit.model_file", "fervit.data.tta", "fervit.data.images"])
def test_the_onnx_runtime_predict_path_never_imports_torch(module):
    """Importing torch is 1.45 s of a 2 s `fervit predict` on the 2-core machine: on ONNX Runtime it never loads."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.e2e
def test_predict_on_the_shipped_onnx_model_classifies_a_photo_without_torch(real_data, tmp_path):
    pytest.importorskip("onnxruntime")
    face = next((real_data / "test" / "happy").iterdir())
    # the real CLI, with a guard that fails the run if anything imports torch
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['fervit', 'predict', sys.argv[1], '--json', "
            "'--no-detect']; runpy.run_module('fervit', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, str(face)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(done.stdout)
    assert len(result["faces"]) == 1 and "ONNX Runtime" in done.stderr
