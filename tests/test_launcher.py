"""Several runs at once: each job is its own process, so it trains exactly as it would alone."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fervit.cli import main
from fervit.config import apply_overrides, load_preset
from fervit import launcher as parallel
from fervit.launcher import Job, run_jobs
from tests.conftest import make_layout

COMMON = ["--preset", "tiny", "--device", "cpu", "--protocol", "fer2013", "--epochs", "2", "--batch-size", "8",
          "--set", "train.threads=1", "--set", "train.eval_batch_size=64"]


def metrics(run_dir) -> list[dict]:
    """The metrics file without its wall-clock column."""
    with open(run_dir / "training_metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.e2e
def test_two_configs_trained_at_once_get_exactly_the_metrics_each_gets_alone(tmp_path, capsys):
    from fervit.training.trainer import train

    root = make_layout(tmp_path / "fer")
    plan = tmp_path / "plan.json"
    jobs = [{"name": "a", "seed": 0, "set": ["optim.lr=0.002"]}, {"name": "b", "seed": 1, "set": ["model.depth=2"]}]
    plan.write_text(json.dumps({"jobs": jobs}))
    rc = main(["train", "--jobs", str(plan), "--parallel", "2", "--data", str(root),
               "--output", str(tmp_path / "runs"), *COMMON])
    out = capsys.readouterr().out
    assert rc == 0, out
    (group,) = (tmp_path / "runs").iterdir()
    threads = torch.get_num_threads()
    try:
        for job in jobs:
            run_dir = group / job["name"]
            assert (run_dir / "results.json").is_file() and (run_dir / "train.log").is_file()
            assert f"{job['name']}: {run_dir}" in out
            cfg = apply_overrides(load_preset("tiny"), [
                f"data.root={root}", "train.device=cpu", "data.protocol=fer2013", "train.epochs=2",
                "train.batch_size=8", "train.threads=1", "train.eval_batch_size=64", f"train.seed={job['seed']}",
                *job["set"]])
            alone = train(cfg, quiet=True, run_dir=tmp_path / "alone" / job["name"])
            assert metrics(run_dir) == metrics(alone)
    finally:
        torch.set_num_threads(threads)


def python_job(tmp_path, name: str, code: str) -> Job:
    return Job(name, [sys.executable, "-c", code], tmp_path / name / "train.log")


def test_a_failed_job_is_one_line_and_the_others_still_finish(tmp_path):
    jobs = [python_job(tmp_path, "bad", "import sys; print('loading'); print('fervit: error: data root x is gone', "
                                        "file=sys.stderr); sys.exit(2)"),
            python_job(tmp_path, "good", "import time; time.sleep(0.3); print('trained')")]
    shown = io.StringIO()
    bad, good = run_jobs(jobs, parallel=2, progress=shown)
    assert not bad.ok and bad.error == "exit 2: data root x is gone"
    assert good.ok and good.error == "" and good.log.read_text().strip() == "trained"
    lines = shown.getvalue().splitlines()
    assert any(line.startswith("bad") and "FAILED: exit 2: data root x is gone" in line for line in lines)
    assert any(line.startswith("good") and "done in" in line for line in lines)


class CountedProcess:
    """Stands in for subprocess.Popen: each process ends on its third poll, and the class counts how many
    have started and not yet been seen to end (how many jobs run at once), without any clock."""

    alive = most = 0

    def __init__(self, cmd, **kwargs):
        CountedProcess.alive += 1
        CountedProcess.most = max(CountedProcess.most, CountedProcess.alive)
        self.polls, self.returncode = 0, None

    def poll(self):
        if self.returncode is None:
            self.polls += 1
            if self.polls == 3:
                self.returncode = 0
                CountedProcess.alive -= 1
        return self.returncode


@pytest.mark.parametrize("limit", [1, 2])
def test_parallel_limits_how_many_jobs_run_at_once(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(subprocess, "Popen", CountedProcess)
    monkeypatch.setattr(CountedProcess, "most", 0)
    results = run_jobs([python_job(tmp_path, f"j{i}", "") for i in range(4)], parallel=limit, progress=None,
                       poll_s=0)
    assert [r.ok for r in results] == [True] * 4 and CountedProcess.alive == 0
    assert CountedProcess.most == limit


def test_mps_asked_for_on_a_machine_without_it_is_a_note_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel.shutil, "which", lambda name: None)
    note = io.StringIO()
    with parallel.mps_daemon(True, asked=True, note=note) as env:
        assert env == {}
    assert "CUDA MPS is not available here" in note.getvalue() and "\n" == note.getvalue()[-1]


@pytest.mark.parametrize("plan, message", [
    ({"jobs": []}, "non-empty \"jobs\" list"),
    ({"jobs": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"jobs": [{"name": "a", "lr": 1}]}, "unknown keys ['lr']"),
    ({"jobs": [{"name": "a", "set": ["model.nope=1"]}]}, "job 'a'"),
])
def test_a_bad_plan_is_a_one_line_error_before_anything_runs(tmp_path, capsys, plan, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    rc = main(["train", "--jobs", str(path), "--output", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_seeds_must_be_distinct_integers(capsys):
    assert main(["train", "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_parallel_without_several_runs_is_a_one_line_error(capsys):
    assert main(["train", "--parallel", "2"]) == 2
    assert "--seeds or --jobs" in capsys.readouterr().err


class SteppedClock:
    """The launcher's clock: sleeping moves it on at once, so a timeout is reached in loop turns, not seconds."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_a_job_that_outlives_its_timeout_is_stopped_and_reported(tmp_path, monkeypatch):
    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    monkeypatch.setattr(parallel, "time", SteppedClock())
    (hung,) = run_jobs([python_job(tmp_path, "hung", "import time; time.sleep(60)")], parallel=1, progress=None,
                       timeout_s=0.5, poll_s=0.2)
    # stopped on the first poll past 0.5 s of the launcher's clock
    assert not hung.ok and hung.error == "timed out after 0.5s" and hung.seconds == pytest.approx(0.6)
    (proc,) = started
    assert proc.returncode == -signal.SIGTERM  # the real process was terminated and reaped, not left sleeping


def test_seeds_make_one_train_job_per_seed_each_with_its_own_run_folder(tmp_path, monkeypatch, capsys):
    launched = []

    def record(jobs, parallel, **kwargs):
        launched.extend(jobs)
        return [parallel_result(job) for job in jobs]

    def parallel_result(job):
        return parallel.JobResult(job.name, 0, 0.0, job.log, job.run_dir)

    monkeypatch.setattr(parallel, "run_jobs", record)
    rc = main(["train", "--preset", "tiny", "--seeds", "3,5", "--parallel", "1", "--output", str(tmp_path),
               "--device", "cpu", "--set", "train.epochs=1"])
    assert rc == 0
    assert [job.name for job in launched] == ["seed3", "seed5"]
    for job, seed in zip(launched, (3, 5)):
        argv = job.cmd[job.cmd.index("train") + 1:]
        assert argv[argv.index("--seed") + 1] == str(seed) and "train.epochs=1" in argv
        assert job.run_dir.parent.parent == tmp_path and job.run_dir.name == f"seed{seed}"
        assert job.log == job.run_dir / "train.log"
    assert launched[0].run_dir.parent.name.endswith("_tiny_seeds")


def test_mps_daemon_is_started_for_the_jobs_with_private_folders_and_stopped_after(tmp_path, monkeypatch):
    # stand-ins for the NVIDIA tools: the control program records each call (arguments, stdin, pipe folder)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(f"#!/bin/sh\nstdin=''\n[ \"$1\" = -d ] || stdin=$(cat)\n"
                       f"echo \"$* | $stdin | $CUDA_MPS_PIPE_DIRECTORY\" >> {calls}\n")
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    code = "import os; print(os.environ.get('CUDA_MPS_PIPE_DIRECTORY', 'none'))"
    jobs = [python_job(tmp_path, f"j{i}", code) for i in range(2)]
    run_jobs(jobs, parallel=2, mps="auto", progress=None)
    start, stop = calls.read_text().splitlines()
    pipe = start.split(" | ")[2]
    assert start.startswith("-d |") and stop.startswith(" | quit |") and stop.endswith(pipe)
    assert all(job.log.read_text().strip() == pipe for job in jobs)  # the jobs joined that daemon
    assert not Path(pipe).exists()  # its folders are gone after


@pytest.mark.parametrize("value", ["0", "-1"])
def test_parallel_below_one_is_one_line_before_anything_runs(tmp_path, capsys, value):
    from fervit.cli import main

    out = tmp_path / "runs"
    assert main(["train", "--seeds", "0,1", "--parallel", value, "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fervit: error: --parallel must be at least 1, got {value}" and not out.exists()


# issue 21: each of these trained into the wrong folder or ended in a traceback
@pytest.mark.parametrize("plan, message", [
    ({"jobs": [{"name": ".."}]}, "job name '..' is not a folder name"),
    ({"jobs": [{"name": "."}]}, "job name '.' is not a folder name"),
    ({"jobs": [{"name": "a", "preset": 5}]}, "\"preset\" must be a preset name or .json file, got 5"),
    ({"jobs": [{"name": "a", "set": None}]}, "\"set\" must be a list of \"KEY=VALUE\" strings, got null"),
    ({"jobs": [{"name": "a", "set": [1, 2]}]}, "\"set\" must be a list of \"KEY=VALUE\" strings, got [1, 2]"),
    ({"jobs": [{"name": "a", "set": "model.depth=2"}]}, "\"set\" must be a list"),
    ({"jobs": [{"name": "a", "seed": "0"}]}, "\"seed\" must be a number"),
    ({"jobs": [{"name": "a", "protocol": 1}]}, "\"protocol\" must be seed or fer2013"),
], ids=["dotdot", "dot", "preset-number", "set-null", "set-numbers", "set-string", "seed-string", "protocol-number"])
def test_a_plan_with_a_job_that_cannot_be_trained_is_one_line_before_anything_runs(tmp_path, capsys, plan, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    rc = main(["train", "--jobs", str(path), "--output", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind, message", [
    ("binary", "is not UTF-8 text"), ("latin-1", "is not UTF-8 text"), ("folder", "is a folder"),
    ("unreadable", "cannot read plan"), ("deep", "nested too deeply"),
])
def test_a_plan_file_that_is_not_a_plan_is_one_line(tmp_path, capsys, monkeypatch, kind, message):
    import errno
    import pathlib

    path = tmp_path / "plan.json"
    if kind == "binary":
        path.write_bytes(bytes(range(256)))
    elif kind == "latin-1":
        path.write_bytes('{"jobs": [{"name": "caf\u00e9"}]}'.encode("latin-1"))
    elif kind == "folder":
        path.mkdir()
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:  # chmod 000 does not stop root, who runs these tests: the refusal a read answers instead
        path.write_text('{"jobs": [{"name": "a"}]}')
        real = pathlib.Path.read_bytes
        monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, "Permission denied")) if self == path else real(self))
    rc = main(["train", "--jobs", str(path), "--output", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "runs").exists()


# a job that says which signal stopped it, as `fervit train` does when it checkpoints on SIGTERM
STOPPABLE = """
import signal, sys, time
from pathlib import Path
def stop(signum, frame):
    Path(sys.argv[1]).write_text(signal.Signals(signum).name)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
print("started", flush=True)
for _ in range(600):
    time.sleep(0.1)
"""


def children_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc (Linux)")
@pytest.mark.timeout(120)
def test_sigterm_to_the_parent_is_passed_on_to_every_job_and_waited_for(tmp_path):
    # issue 21: SIGTERM to the parent of --seeds / sweep --workers left the children training
    import signal
    import subprocess
    import time

    script = ("import sys\nfrom pathlib import Path\nfrom fervit.launcher import Job, run_jobs\n"
              f"stoppable = {STOPPABLE!r}\n"
              "jobs = [Job(f'j{i}', [sys.executable, '-c', stoppable, str(Path(sys.argv[1]) / f'j{i}.sig')],"
              " Path(sys.argv[1]) / f'j{i}.log') for i in range(2)]\n"
              "try:\n    run_jobs(jobs, 2, progress=None)\n"
              "except Exception as e:\n    print(f'fervit: error: {e}', file=sys.stderr); sys.exit(e.exit_code)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                (tmp_path / f"j{i}.log").is_file() and "started" in (tmp_path / f"j{i}.log").read_text()
                for i in range(2)):
            time.sleep(0.1)
        kids = children_of(parent.pid)
        assert len(kids) == 2, "the jobs did not start"
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 128 + signal.SIGTERM
    assert err.strip().startswith("fervit: error: stopped by SIGTERM: passed it on") and "\n" not in err.strip()
    assert all((tmp_path / f"j{i}.sig").read_text() == "SIGTERM" for i in range(2))  # each job got it itself
    assert not any(Path(f"/proc/{k}").exists() for k in kids)  # and the parent waited: none left as an orphan


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from /proc (Linux)")
@pytest.mark.timeout(180)
def test_sigterm_to_fervit_train_seeds_leaves_no_job_training(tmp_path):
    import signal
    import subprocess
    import time

    root = make_layout(tmp_path / "fer")
    # epochs enough that no job can finish before the signal however loaded the machine (500 once did, in a full run here)
    parent = subprocess.Popen([sys.executable, "-m", "fervit", "train", "--seeds", "0,1", "--data", str(root),
                               "--output", str(tmp_path / "runs"), *COMMON[:6], "--epochs", "100000", "--quiet",
                               "--set", "train.threads=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not list((tmp_path / "runs").rglob("training_metrics.csv")):
            time.sleep(0.2)  # a job that has finished an epoch is training, with its stop handler in place
        kids = children_of(parent.pid)
        assert kids, "the jobs did not start"
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("fervit: error: stopped by SIGTERM")
    assert not any(Path(f"/proc/{k}").exists() for k in kids)
