"""Several training processes at once on one machine (one GPU): seeds, plans, sweep workers, the bench.

Each job is a separate process (normally a plain `fervit train` run), so its results are exactly those of
training it alone: nothing is shared but the device. On a GPU with CUDA MPS (`nvidia-cuda-mps-control`)
the processes' kernels run side by side instead of time-slicing; `mps_daemon` starts a private daemon for
the duration and stops it after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from fervit.errors import FervitError
from fervit.run_folder import LOG, progress_line

PASSED_ON = ("SIGTERM", "SIGHUP")  # stop signals the parent passes on to its jobs (SIGINT reaches them anyway)
STOP_WAIT_S = 120.0  # how long a stopped job may take to write its checkpoint before it is killed


class JobsStopped(FervitError):
    """A stop signal ended the parent of several jobs; it passed the signal on and waited for every job."""

    def __init__(self, signame: str, signum: int):
        super().__init__(f"stopped by {signame}: passed it on to the running jobs and waited for them to end; "
                         "finished jobs keep their run folders, stopped ones their checkpoints")
        self.exit_code = 128 + signum  # what a shell reports for a process a signal ended


@dataclass
class Job:
    """One process to run: `cmd` (argv), its log file, and, for a training job, its run folder."""

    name: str
    cmd: list[str]
    log: Path
    run_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class JobResult:
    name: str
    returncode: int
    seconds: float
    log: Path
    run_dir: Path | None = None
    error: str = ""  # one line, empty when the job succeeded

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def train_job(name: str, train_args: list[str], run_dir: str | Path) -> Job:
    """A `fervit train ... --run-dir RUN_DIR --quiet` job whose log is RUN_DIR/train.log."""
    run_dir = Path(run_dir)
    cmd = [sys.executable, "-m", "fervit", "train", *train_args, "--run-dir", str(run_dir), "--quiet"]
    return Job(name, cmd, run_dir / LOG, run_dir)


def last_error_line(log: Path) -> str:
    """The one line that says why a job failed: fervit's own error line, else the log's last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"no log at {log}"
    for line in reversed(lines):
        if line.startswith("fervit: error:"):
            return line[len("fervit: error:"):].strip()
    return lines[-1][:300] if lines else "exited without output"


def job_progress(job: Job) -> str:
    """'epoch 3/60, val acc 0.512' for a training job, or '' before its first epoch (and for other jobs)."""
    return progress_line(job.run_dir) if job.run_dir is not None else ""


class ProgressDisplay:
    """One line per job. On a terminal the block is redrawn in place; elsewhere a line is printed only
    when a job's line changes, so that a log file stays short."""

    def __init__(self, jobs: list[Job], stream: TextIO | None, interval_s: float = 1.0):
        self.names = [j.name for j in jobs]
        self.width = max((len(n) for n in self.names), default=0)
        self.stream, self.interval_s = stream, interval_s
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.shown: dict[str, str] = {}
        self.drawn = 0
        self.last = 0.0

    def update(self, states: dict[str, str], force: bool = False) -> None:
        if self.stream is None or (not force and time.monotonic() - self.last < self.interval_s):
            return
        self.last = time.monotonic()
        lines = {n: f"{n:<{self.width}}  {states.get(n, 'waiting')}" for n in self.names}
        if self.tty:
            if self.drawn:
                self.stream.write(f"\x1b[{self.drawn}F")
            self.stream.write("".join(f"\x1b[2K{lines[n]}\n" for n in self.names))
            self.drawn = len(self.names)
        else:
            for n in self.names:
                if self.shown.get(n) != lines[n]:
                    self.stream.write(lines[n] + "\n")
        self.shown = lines
        self.stream.flush()


def run_jobs(jobs: list[Job], parallel: int, *, mps: str = "off", progress: TextIO | None = sys.stderr,
             on_start: Callable[[Job], None] | None = None, timeout_s: float | None = None,
             poll_s: float = 0.2) -> list[JobResult]:
    """Run every job, at most `parallel` at a time; returns one result per job, in the jobs' order.

    A failed job costs only itself: the others run on, and its result carries a one-line `error`.
    `mps`: "auto" uses CUDA MPS when the machine has it, "on" asks for it (a note when absent), "off".
    `progress`: where the one-line-per-job display goes (None: silent). `timeout_s`: a job running longer
    is terminated and fails with "timed out".
    """
    if parallel < 1:
        raise FervitError(f"--parallel must be at least 1, got {parallel}")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise FervitError(f"job names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}")
    display = ProgressDisplay(jobs, progress)
    results: dict[str, JobResult] = {}
    running: dict[str, tuple[subprocess.Popen, TextIO, float]] = {}
    waiting = list(jobs)
    by_name = {j.name: j for j in jobs}
    use_mps = mps != "off" and min(parallel, len(jobs)) > 1
    stop = {"sig": signal.SIGTERM}

    def stopped(signum, frame):
        stop["sig"] = signum
        raise JobsStopped(signal.Signals(signum).name, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # without this, SIGTERM ended the parent alone and
        for name in PASSED_ON:  # its jobs trained on as orphans
            if hasattr(signal, name):
                previous[getattr(signal, name)] = signal.signal(getattr(signal, name), stopped)
    with mps_daemon(use_mps, mps == "on", progress) as mps_env:
        try:
            while waiting or running:
                while waiting and len(running) < parallel:
                    job = waiting.pop(0)
                    job.log.parent.mkdir(parents=True, exist_ok=True)
                    log = open(job.log, "w")
                    env = {**os.environ, **mps_env, **job.env}
                    if on_start is not None:
                        on_start(job)
                    proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                    running[job.name] = (proc, log, time.monotonic())
                for name, (proc, log, t0) in list(running.items()):
                    timed_out = timeout_s is not None and time.monotonic() - t0 > timeout_s
                    if proc.poll() is None and not timed_out:
                        continue
                    if timed_out and proc.poll() is None:
                        proc.terminate()
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(timeout=10)
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
                    log.close()
                    del running[name]
                    job = by_name[name]
                    rc = proc.returncode
                    error = (f"timed out after {timeout_s:g}s" if timed_out else
                             "" if rc == 0 else f"exit {rc}: {last_error_line(job.log)}")
                    results[name] = JobResult(name, rc if not timed_out else -1, time.monotonic() - t0, job.log,
                                              job.run_dir, error)
                display.update(_states(jobs, results, running), force=not running and not waiting)
                if running:
                    time.sleep(poll_s)
        finally:  # Ctrl-C, a stop signal or an error here: no orphaned training processes
            for sig in previous:  # a second signal must not cut the wait short
                signal.signal(sig, signal.SIG_IGN)
            for proc, log, _ in running.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(stop["sig"])  # the job checkpoints and exits, as if it had got it itself
            for proc, log, _ in running.values():
                try:
                    proc.wait(timeout=STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return [results[j.name] for j in jobs]


def _states(jobs: list[Job], results: dict[str, JobResult], running: dict) -> dict[str, str]:
    states = {}
    for job in jobs:
        if job.name in results:
            r = results[job.name]
            done = job_progress(job)
            states[job.name] = (f"done in {r.seconds:.0f}s" + (f" ({done})" if done else "") if r.ok
                                else f"FAILED: {r.error}")
        elif job.name in running:
            states[job.name] = job_progress(job) or "starting"
    return states


def mps_available() -> bool:
    """Whether this machine can run a CUDA MPS daemon (the control binary and an NVIDIA GPU)."""
    return shutil.which("nvidia-cuda-mps-control") is not None and shutil.which("nvidia-smi") is not None


@contextlib.contextmanager
def mps_daemon(wanted: bool, asked: bool = False, note: TextIO | None = sys.stderr):
    """Start a private CUDA MPS daemon for the block; yields the environment the jobs need to join it.

    The daemon gets its own pipe and log folders (no root needed, no clash with a system daemon) and is
    stopped on the way out. Without MPS on the machine the block runs without it, with a note if `asked`.
    """
    if not wanted:
        yield {}
        return
    if not mps_available():
        if asked and note is not None:
            print("fervit: note: CUDA MPS is not available here (no nvidia-cuda-mps-control); the jobs share "
                  "the GPU by time-slicing", file=note)
        yield {}
        return
    folder = Path(tempfile.mkdtemp(prefix="fervit-mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for d in env.values():
        Path(d).mkdir()
    full = {**os.environ, **env}
    started = subprocess.run(["nvidia-cuda-mps-control", "-d"], env=full, capture_output=True, text=True)
    if started.returncode:
        if note is not None:
            print(f"fervit: note: CUDA MPS did not start ({(started.stderr or started.stdout).strip()[:200]}); "
                  "the jobs share the GPU by time-slicing", file=note)
        shutil.rmtree(folder, ignore_errors=True)
        yield {}
        return
    if note is not None:
        print("fervit: CUDA MPS daemon started for these jobs", file=note)
    try:
        yield env
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=full, capture_output=True, text=True)
        shutil.rmtree(folder, ignore_errors=True)


def summary_lines(results: list[JobResult]) -> list[str]:
    """One line per job: its run folder, or why it failed."""
    return [f"{r.name}: {r.run_dir or r.log}" if r.ok else f"{r.name}: failed, {r.error} (log: {r.log})"
            for r in results]
