"""experiments/gpu_experiment.py packs checkpoints in the package's model-file format, within what comes back."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from helpers import save_tiny_checkpoint
from safetensors import safe_open

from fervit.model_file import ModelFile
from fervit.models.checkpoint import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_experiment.py"


def gpu_experiment():
    spec = importlib.util.spec_from_file_location("gpu_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_experiment"] = module
    spec.loader.exec_module(module)
    return module


def runs(tmp_path, n):
    dirs = {}
    for i in range(n):
        dirs[f"job{i}"] = tmp_path / "runs" / f"job{i}"
        save_tiny_checkpoint(dirs[f"job{i}"], seed=i)
    return dirs


def test_a_packed_checkpoint_is_fp16_and_loads_with_its_runs_description(tmp_path):
    gpu = gpu_experiment()
    out = tmp_path / "out"
    out.mkdir()
    dirs = runs(tmp_path, 1)
    assert gpu.pack_checkpoints(dirs, ["job0"], out) == {"job0": "fp16"}
    assert sorted(p.name for p in out.iterdir()) == ["job0.safetensors"]  # no second file: the run holds the .json
    with safe_open(str(out / "job0.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys() if f.get_tensor(k).is_floating_point())
    (out / "job0.json").write_bytes((dirs["job0"] / "best_model.json").read_bytes())
    packed, _ = load_model(out / "job0.safetensors")
    original, _ = load_model(dirs["job0"])
    for (k, a), b in zip(packed.state_dict().items(), original.state_dict().values()):
        torch.testing.assert_close(a, b.half().float() if b.is_floating_point() else b, msg=k)
    assert ModelFile.read(out / "job0.safetensors").model == ModelFile.read(dirs["job0"] / "best_model.safetensors").model


def test_only_as_many_checkpoints_are_packed_as_the_return_limits_allow_best_first(tmp_path):
    gpu = gpu_experiment()
    out = tmp_path / "out"
    out.mkdir()
    dirs = runs(tmp_path, 3)
    limits = gpu.ReturnLimits(files=4)  # summary.json and runs.tar.gz take two of them
    packed = gpu.pack_checkpoints(dirs, ["job2", "job0", "job1"], out, limits)
    assert packed["job2"] == packed["job0"] == "fp16" and packed["job1"].startswith("not packed")
    assert sorted(p.name for p in out.iterdir()) == ["job0.safetensors", "job2.safetensors"]
    too_small = gpu.ReturnLimits(file_mib=0.001)
    assert gpu.pack_checkpoints(dirs, ["job1"], tmp_path, too_small)["job1"].startswith("not packed")
