"""Data-parallel training: two gloo processes under torchrun follow the single-process recipe exactly."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_layout

from fervit.config import apply_overrides, load_preset
from fervit.data.dataset import load_fer
from fervit.errors import FervitError
from fervit.training.distributed import DistContext, init_distributed, wrap_model
from fervit.device import resolve_device
from fervit.training.step import shard_loss
from fervit.training.trainer import train

# vit_patch has no BatchNorm: torch cannot sync BatchNorm on CPU, so only a BN-free model can match exactly
SETTINGS = ["train.threads=1", "train.batch_size=16", "train.epochs=3", "model.name=vit_patch",
            "model.patch_size=8", "optim.ema_decay=0.9", "augment.mixup_alpha=0.2"]


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "training_metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.e2e
def test_two_gloo_processes_write_one_run_folder_matching_a_single_process_run(tmp_path):
    root = make_layout(tmp_path / "fer", per_class=8)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fervit", "train", "--preset", "tiny", "--data", str(root), "--cache-dir", str(cache),
           "--output", str(tmp_path / "ddp"), "--device", "cpu", "--quiet"]
    for setting in SETTINGS:
        cmd += ["--set", setting]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (ddp_run,) = (tmp_path / "ddp").iterdir()  # one run folder: only rank 0 writes
    assert done.stdout.strip() == str(ddp_run)  # and only rank 0 prints it
    cfg = apply_overrides(load_preset("tiny"), [f"data.root={root}", f"data.cache_dir={cache}",
                                                f"train.output={tmp_path / 'single'}", "train.device=cpu",
                                                *SETTINGS])
    single_run = train(cfg, quiet=True)

    ddp_rows, single_rows = read_rows(ddp_run), read_rows(single_run)
    assert len(ddp_rows) == len(single_rows) == 3
    for ddp, single in zip(ddp_rows, single_rows):
        assert ddp == pytest.approx(single, abs=1e-4)
    ddp_res = json.loads((ddp_run / "results.json").read_text())
    single_res = json.loads((single_run / "results.json").read_text())
    assert ddp_res["world_size"] == 2
    assert ddp_res["test"]["accuracy"] == pytest.approx(single_res["test"]["accuracy"], abs=1e-6)
    assert ddp_res["test"]["loss"] == pytest.approx(single_res["test"]["loss"], abs=1e-4)


@pytest.mark.parametrize("soft", [False, True])
def test_shard_losses_add_up_to_the_whole_batch_loss_with_class_weights(soft):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=gen)
    y = torch.randint(0, 7, (12,), generator=gen)
    target = torch.softmax(torch.randn(12, 7, generator=gen), -1) if soft else y
    weights = torch.rand(7, generator=gen) + 0.5
    whole = F.cross_entropy(logits, target, weight=weights, label_smoothing=0.1)
    shares = sum(shard_loss(lg, t, y, weights, 0.1) for lg, t in zip(logits.tensor_split(3), target.tensor_split(3)))
    assert float(shares) == pytest.approx(float(whole), abs=1e-6)


def test_a_single_process_gets_no_ddp_wrapper():
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, DistContext()) is model


def test_a_launcher_environment_without_a_rendezvous_address_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(FervitError, match="torchrun"):
        init_distributed("cpu", resolve_device)


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(tiny_layout, tmp_path):
    cfg = apply_overrides(load_preset("tiny"), [f"data.root={tiny_layout}", f"train.output={tmp_path}",
                                                "train.device=cpu", "train.batch_size=16"])
    with pytest.raises(FervitError, match="split evenly over 3 processes"):
        train(cfg, quiet=True, data=load_fer(tiny_layout, progress=False), ctx=DistContext(world_size=3))
