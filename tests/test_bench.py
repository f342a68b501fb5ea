"""`fervit bench`: a --quick smoke run on a tiny layout gives a table and JSON of the documented shape.

No timing is asserted here: the numbers live in BENCHMARKS.md, measured on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fervit.cli import main
from fervit.config import AugmentConfig
from fervit.data.augment import normalize
from fervit.errors import FervitError

PIPELINE_KEYS = {"train_images_s", "epoch_s", "eval_images_s", "latency_ms", "peak_mem_mib", "tflops",
                 "peak_fraction"}
MODEL_KEYS = {"params", "batch_size", "compiled", "forward_gflops_per_image", "train_gflops_per_image", "fervit",
              "usual", "train_ratio", "eval_ratio"}
TOP_KEYS = {"command", "date_utc", "machine", "settings", "dataset", "data_path", "data_path_ratio", "kornia_ratio",
            "bf16_peak_tflops", "peak_mem_kind", "models", "table"}


@pytest.fixture(scope="module")
def bench_extras():
    from fervit.benchmark.pipelines import kornia_augment, torchvision_transforms

    try:
        torchvision_transforms()
        kornia_augment(AugmentConfig())
    except FervitError as e:
        pytest.skip(f"the bench extras are not installed ({e})")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_bench_prints_the_table_and_writes_json_of_the_documented_shape(bench_extras, tiny_layout, tmp_path,
                                                                              capsys):
    out = tmp_path / "bench.json"
    # the tiny preset and a handful of images keep this a smoke run of every code path
    rc = main(["bench", "--quick", "--data", str(tiny_layout), "--json", str(out), "--models", "tiny",
               "--batch-size", "4", "--steps", "1", "--data-images", "16", "--eval-images", "8", "--repeats", "1",
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert TOP_KEYS <= set(d)
    assert d["table"] in printed and "fervit/usual" in printed
    assert d["command"].startswith("fervit bench --quick")
    assert d["machine"]["torch"] == torch.__version__ and d["machine"]["cpu_count"] >= 1
    assert set(d["data_path"]) == {"fervit", "kornia", "usual"}
    assert all(positive(p["images_s"]) for p in d["data_path"].values())
    assert math.isclose(d["data_path_ratio"], d["data_path"]["fervit"]["images_s"] / d["data_path"]["usual"]["images_s"])
    assert d["dataset"]["train_images"] == 28 and d["dataset"]["test_images"] == 56
    assert list(d["models"]) == ["tiny"]
    row = d["models"]["tiny"]
    assert MODEL_KEYS <= set(row) and row["batch_size"] == 4
    for pipe in ("fervit", "usual"):
        assert PIPELINE_KEYS <= set(row[pipe])
        assert all(positive(row[pipe][k]) for k in PIPELINE_KEYS - {"peak_fraction"})
    assert math.isclose(row["train_ratio"], row["fervit"]["train_images_s"] / row["usual"]["train_images_s"])
    assert row["train_gflops_per_image"] > row["forward_gflops_per_image"] > 0
    assert math.isclose(row["fervit"]["epoch_s"] * row["fervit"]["train_images_s"], 28_709)


def test_missing_data_folder_is_a_one_line_error(tmp_path, capsys):
    rc = main(["bench", "--quick", "--data", str(tmp_path / "nowhere"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("fervit: error:") and "nowhere" in err and "\n" not in err


def test_unknown_model_is_a_one_line_error(tiny_layout, capsys):
    rc = main(["bench", "--quick", "--data", str(tiny_layout), "--models", "resnet9000", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "resnet9000" in err and "\n" not in err


def test_json_into_a_missing_folder_is_refused_before_any_timing(tiny_layout, tmp_path, capsys):
    rc = main(["bench", "--quick", "--data", str(tiny_layout), "--json", str(tmp_path / "no" / "b.json"), "--quiet"])
    assert rc == 2 and "--json" in capsys.readouterr().err


def test_batches_are_drawn_epoch_by_epoch_without_repeats_inside_an_epoch():
    from fervit.benchmark.run import index_batches

    indices = torch.arange(100, 130)
    drawn = torch.cat(list(index_batches(indices, 6, 10, torch.Generator().manual_seed(0))))
    for epoch in drawn.view(2, 30):
        assert torch.equal(epoch.sort().values, indices)


def test_usual_pipeline_with_every_op_off_computes_fervits_eval_input(bench_extras):
    # the baseline must feed the model the same pixels fervit does, up to the random ops
    from PIL import Image

    from fervit.benchmark.pipelines import usual_train_transform

    identity = AugmentConfig(hflip=0.0, rotation=0.0, translate=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                             brightness=0.0, contrast=0.0, erase_p=0.0)
    image = torch.randint(0, 256, (48, 48), dtype=torch.uint8)
    usual = usual_train_transform(identity)(Image.fromarray(image.numpy()))
    torch.testing.assert_close(usual, normalize(image[None])[0], atol=1e-6, rtol=0)
    full = usual_train_transform(dataclasses.replace(AugmentConfig()))(Image.fromarray(image.numpy()))
    assert full.shape == (1, 48, 48) and full.min() >= -1 and full.max() <= 1
