"""The layers import one way: serving never pulls in the trainer (nor DDP, resume or matplotlib)."""

from __future__ import annotations

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
