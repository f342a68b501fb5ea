"""scripts/test_extras/sitecustomize.py lets test processes import a torchvision whose C++ ops cannot load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHIM = Path(__file__).resolve().parents[1] / "scripts" / "test_extras"
# what PyPI's torchvision does on import beside the CPU torch: register fake kernels for its ops, which fails when
# its C++ library (which defines them) did not load
FAKE_TORCHVISION = '''
import torch
torch.library.register_fake("torchvision::nms")(lambda dets, scores, iou_threshold: dets.new_empty(0))
'''


@pytest.mark.parametrize("with_shim", [True, False])
def test_the_shim_declares_the_ops_before_torchvision_is_imported(tmp_path, with_shim):
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(FAKE_TORCHVISION)
    path = [str(SHIM)] if with_shim else []
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != SHIM]  # test.sh's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(tmp_path), *inherited])}
    done = subprocess.run([sys.executable, "-c", "import torchvision"], env=env, capture_output=True, text=True,
                          timeout=120)
    if with_shim:
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        assert done.returncode != 0 and "torchvision::nms" in done.stderr
