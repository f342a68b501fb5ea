"""How OpenMP's idle threads wait (`fervit.omp`): chosen per command before torch loads, and recorded by a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import make_layout
from helpers import tiny_run_config

from fervit import omp
from fervit.training.trainer import train


@pytest.mark.parametrize("args, busy, policy", [
    (["train", "--preset", "cpu_fast"], 0.1, "ACTIVE"),  # one run, idle machine: spin
    (["train", "--preset", "cpu_fast"], 1.3, "PASSIVE"),  # other work is running
    (["train", "--jobs", "plan.json"], 0.0, "PASSIVE"),  # several runs share the cores
    (["train", "--seeds=0,1,2"], 0.0, "PASSIVE"),
    (["predict", "face.png"], 0.0, "PASSIVE"),  # not training
    ([], 0.0, "PASSIVE"),
    (["train"], None, "PASSIVE"),  # the load cannot be read
])
def test_only_a_single_training_run_on_an_idle_machine_spins(args, busy, policy):
    chosen, why = omp.wait_policy(args, busy)
    assert chosen == policy and why


def fervit_cli_policy(argv: list[str], busy: float, env: dict) -> list[str]:
    """OMP_WAIT_POLICY and omp.describe() after importing the CLI in a fresh process with this argv, while other
    work uses `busy` cores."""
    code = (f"import os, sys; from fervit import omp; omp.busy_cores = lambda: {busy}; sys.argv = {argv!r}; "
            "import fervit.cli; print(os.environ['OMP_WAIT_POLICY']); print(omp.describe())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_the_cli_sets_it_before_torch_loads_and_says_why():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    policy, described = fervit_cli_policy(["fervit", "train"], 0.2, env)
    assert policy == "ACTIVE" and described == "ACTIVE (0.2 cores busy at the start: the machine is idle)"
    policy, described = fervit_cli_policy(["fervit", "train"], 2.0, env)
    assert policy == "PASSIVE" and "other work is running" in described


def test_a_policy_set_in_the_environment_is_kept():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    assert fervit_cli_policy(["fervit", "train"], 0.0, env) == ["PASSIVE", "PASSIVE (set in the environment)"]


def test_busy_cores_sees_a_busy_process_beside_it():
    idle = omp.busy_cores()
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = omp.busy_cores(0.5)
    finally:
        loop.kill()
        loop.wait()
    assert idle is not None and busy is not None and busy >= 0.7 and busy > idle - 0.5


def test_a_run_records_the_policy_it_trained_under(tmp_path):
    layout = make_layout(tmp_path / "fer", per_class=6)
    run = train(tiny_run_config("train.epochs=1", "train.batch_size=16", root=layout, output=tmp_path), quiet=True)
    runtime = json.loads((run / "results.json").read_text())["runtime"]
    assert runtime["omp_wait"] == omp.describe() and runtime["omp_wait"]


def test_the_wait_policy_bench_times_a_real_training_step():
    from fervit.benchmark.wait_policy import SETTINGS, images_s

    assert {"PASSIVE", "ACTIVE"} <= set(SETTINGS) and images_s("tiny", 1, 2) > 0
