"""`fervit bench`: a --quick smoke run on a tiny layout gives a table and JSON of the documented shape.

No timing is asserted here: the numbers live in BENCHMARKS.md, measured on purpose.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout

import pytest
import torch

from fervit.cli import main
from fervit.config import AugmentConfig, RunConfig, load_preset
from fervit.data.images import normalize
from fervit.errors import FervitError
from tests.conftest import make_layout

PIPELINE_KEYS = {"train_images_s", "epoch_s", "eval_images_s", "latency_ms", "peak_mem_mib", "tflops",
                 "peak_fraction"}
MODEL_KEYS = {"params", "batch_size", "compiled", "forward_gflops_per_image", "train_gflops_per_image", "fervit",
              "usual", "usual_few", "train_ratio", "train_ratio_few", "eval_ratio", "breakdown"}
TOP_KEYS = {"command", "date_utc", "machine", "settings", "dataset", "data_path", "data_path_ratio",
            "data_path_ratio_few", "kornia_ratio", "bf16_peak_tflops", "peak_mem_kind", "models", "step_model",
            "step_modes", "fused_attention", "concurrency", "table", "cpu_peak", "threads_under_load", "as_run"}
PHASES = {"data_augment", "forward", "backward", "optimizer"}

# fixtures that take over 5 s to build: conftest marks every test that needs one slow
SLOW_FIXTURES = {"quick_bench"}


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


@pytest.fixture(scope="module")
def quick_bench(bench_extras, tmp_path_factory):
    """One --quick run on a tiny layout: the tiny preset and a handful of images keep it a smoke run of every
    code path, every row included."""
    tmp = tmp_path_factory.mktemp("bench")
    layout = make_layout(tmp / "fer")
    out = tmp / "bench.json"
    printed = io.StringIO()
    with redirect_stdout(printed):
        rc = main(["bench", "--quick", "--data", str(layout), "--json", str(out), "--models", "tiny",
                   "--batch-size", "4", "--steps", "1", "--data-images", "16", "--eval-images", "8", "--repeats", "1",
                   "--few-workers", "1", "--quiet"])
    assert rc == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_quick_bench_prints_the_table_and_writes_json_of_the_documented_shape(quick_bench):
    d, printed = quick_bench
    assert TOP_KEYS <= set(d) and "partial" not in d
    assert d["table"] in printed and "fervit/usual" in printed
    assert d["command"].startswith("fervit bench --quick")
    assert d["machine"]["torch"] == torch.__version__ and d["machine"]["cpu_count"] >= 1
    assert set(d["data_path"]) == {"fervit", "kornia", "usual", "usual_few"}
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


def test_the_usual_pipeline_is_timed_with_all_cpus_and_with_few_workers(quick_bench):
    d, _ = quick_bench
    assert d["data_path"]["usual_few"]["workers"] == 1 == d["settings"]["few_workers"]
    assert d["data_path"]["usual"]["workers"] == d["settings"]["workers"]
    row = d["models"]["tiny"]
    assert row["usual_few"]["workers"] == 1 and positive(row["usual_few"]["train_images_s"])
    assert math.isclose(row["train_ratio_few"], row["fervit"]["train_images_s"] / row["usual_few"]["train_images_s"])
    assert "usual 1w" in d["table"]


def test_the_step_breakdown_has_the_four_phases_in_milliseconds(quick_bench):
    d, _ = quick_bench
    b = d["models"]["tiny"]["breakdown"]
    assert set(b["wall_ms"]) == PHASES and all(positive(v) for v in b["wall_ms"].values())
    assert "device_ms" not in b  # torch.profiler's device time is CUDA only
    assert "where a training step's time goes" in d["table"]


def test_step_mode_rows_cover_every_mode_batch_size_and_channels_last(quick_bench):
    d, _ = quick_bench
    rows = d["step_modes"]
    plain = {(r["mode"], r["batch_size"]) for r in rows if not r["channels_last"]}
    # a CPU has no CUDA graphs: no cuda_graph rows there (they would time the eager step again)
    assert plain == {("eager", 4), ("eager", 8), ("eager", 16), ("compile", 4)}
    assert {r["mode"] for r in rows if r["channels_last"]} == {"eager", "compile"}
    for r in rows:
        assert positive(r["train_images_s"]) and positive(r["tflops"]) and r["setup_s"] >= 0
        assert r["lr"] == pytest.approx(1e-3 * math.sqrt(r["batch_size"] / 4))  # the tiny preset's lr at batch 4
    assert d["fused_attention"]["fused"] is False


def test_a_cpu_bench_measures_its_own_peak_and_the_share_of_it_each_model_reaches(quick_bench):
    d, _ = quick_bench
    peak = d["cpu_peak"]
    for key in ("gemm_fp32", "gemm_bf16", "conv_fp32_nchw", "conv_fp32_nhwc", "conv_bf16_nchw", "conv_bf16_nhwc"):
        assert positive(peak[key]), key
    assert peak["peak_gflops"] == max(peak["conv_bf16_nchw"], peak["conv_bf16_nhwc"])
    assert d["bf16_peak_tflops"] == pytest.approx(peak["peak_gflops"] / 1000)
    fervit = d["models"]["tiny"]["fervit"]
    assert fervit["peak_fraction"] == pytest.approx(fervit["tflops"] / d["bf16_peak_tflops"])
    assert positive(fervit["latency_fp32_ms"]) and positive(fervit["eval_fp32_images_s"])
    assert positive(fervit["eval_fp32_nchw_images_s"]) and "NCHW weights" in d["table"]
    assert "CPU peak, measured" in d["table"]


def test_a_cpu_bench_times_training_threads_idle_and_beside_a_busy_process(quick_bench):
    d, _ = quick_bench
    rows = d["threads_under_load"]
    assert {(r["threads"], r["busy_processes"]) for r in rows} == {(t, b) for t in {1, max(d["machine"]["cpu_count"], 2)}
                                                                    for b in (0, 1)}
    assert all(positive(r["train_images_s"]) for r in rows)
    assert "training threads beside other work" in d["table"]


def test_a_cpu_bench_times_each_pipeline_in_a_fresh_process_under_its_own_wait_policy(quick_bench):
    d, _ = quick_bench
    rows = d["as_run"]["tiny"]  # the step model: both pipelines
    assert positive(rows["fervit"]["train_images_s"]) and positive(rows["usual"]["train_images_s"])
    assert rows["ratio"] == pytest.approx(rows["fervit"]["train_images_s"] / rows["usual"]["train_images_s"])
    assert rows["fervit"]["train_images_s"] == max(rows["fervit"]["timings"]) and rows["fervit"]["rounds"] == 1
    assert rows["usual"]["omp_wait"].startswith("OpenMP's default") or "environment" in rows["usual"]["omp_wait"]
    assert rows["fervit"]["peak_fraction"] == pytest.approx(rows["fervit"]["tflops"] / d["bf16_peak_tflops"])
    assert "training as each pipeline runs" in d["table"]


def test_the_fresh_usual_process_does_not_inherit_the_wait_policy_fervit_chose(monkeypatch):
    from fervit import omp
    from fervit.benchmark import as_run

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(omp, "_chosen", ("PASSIVE", "not a training run"))  # what `fervit bench` itself got
    monkeypatch.setattr(omp, "busy_cores", lambda: 0.0)
    envs = as_run.environments()
    assert "OMP_WAIT_POLICY" not in envs["usual"][0] and envs["usual"][1].startswith("OpenMP's default")
    assert envs["fervit"][0]["OMP_WAIT_POLICY"] == "ACTIVE" and "fervit train" in envs["fervit"][1]
    monkeypatch.setattr(omp, "busy_cores", lambda: 1.0)  # other work running: fervit train would sleep
    assert as_run.environments()["fervit"][0]["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_wait_policy_the_user_set_holds_for_both_fresh_processes(monkeypatch):
    from fervit import omp
    from fervit.benchmark import as_run

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr(omp, "_chosen", None)  # the user's, not fervit's
    envs = as_run.environments()
    assert envs["usual"][0]["OMP_WAIT_POLICY"] == envs["fervit"][0]["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "set in the environment" in envs["usual"][1] and "set in the environment" in envs["fervit"][1]


def test_concurrency_rows_give_the_aggregate_throughput_of_models_trained_at_once(quick_bench):
    d, _ = quick_bench
    rows = d["concurrency"]
    assert [r["processes"] for r in rows] == [1, 2]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert positive(r["images_s"]) and len(r["per_process_images_s"]) == r["processes"]
        assert r["x_one"] == pytest.approx(r["images_s"] / rows[0]["images_s"])
    assert rows[0]["images_s"] == pytest.approx(rows[0]["per_process_images_s"][0])  # one process: its own window
    assert rows[0]["x_one"] == 1.0
    assert "models trained at once" in d["table"]


def test_concurrent_processes_start_their_timed_windows_only_when_all_are_ready(tmp_path):
    import threading

    from fervit.benchmark.concurrent import wait_for_all

    first = threading.Thread(target=wait_for_all, args=(tmp_path, 2, 0), daemon=True)
    first.start()
    first.join(timeout=0.5)
    assert first.is_alive()  # one of two ready: it waits
    wait_for_all(tmp_path, 2, 1)  # the second is ready: both go
    first.join(timeout=30)
    assert not first.is_alive()


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
    usual = usual_train_transform(RunConfig(augment=identity))(Image.fromarray(image.numpy()))
    torch.testing.assert_close(usual, normalize(image[None])[0], atol=1e-6, rtol=0)
    full = usual_train_transform(RunConfig())(Image.fromarray(image.numpy()))
    assert full.shape == (1, 48, 48) and full.min() >= -1 and full.max() <= 1


def test_the_usual_pipeline_trains_on_the_side_fervit_trains_the_preset_on(bench_extras):
    # a preset trained on 44 px crops: the usual pipeline on whole 48 px faces would do 1.19x the work, and the
    # speed ratio would flatter fervit
    from PIL import Image

    from fervit.benchmark.pipelines import usual_train_transform

    preset = load_preset("cpu_cnn")
    assert preset.model.crop_size == 44
    image = Image.fromarray(torch.randint(0, 256, (48, 48), dtype=torch.uint8).numpy())
    assert usual_train_transform(preset)(image).shape == (1, 44, 44)


def test_the_busy_process_runs_for_the_block_and_is_gone_after(monkeypatch):
    import subprocess

    from fervit.benchmark import busy

    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(busy.subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    with busy.busy_process():
        assert started and started[0].poll() is None  # running while the block runs
    assert started[0].poll() is not None  # killed and reaped on the way out
    with busy.busy_process(active=False):
        assert len(started) == 1  # no load asked for, none started


def test_one_worker_count_is_tabled_once(quick_bench):
    import copy

    from fervit.benchmark.table import format_table

    d = copy.deepcopy(quick_bench[0])
    d["settings"]["workers"] = d["settings"]["few_workers"]  # a machine whose core count gives the same count
    for pipes in [d["data_path"], *d["models"].values()]:
        pipes["usual"] = dict(pipes["usual_few"])
    table = format_table(d)
    assert table.count("usual 1w") == 1 and "against 1 workers" not in table and "the same, " not in table
    assert "with 1 DataLoader workers" in table
    assert quick_bench[0]["table"].count("usual 1w") == 1  # two counts: each row once, under its own count
