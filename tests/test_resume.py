"""Preemption-safe exact resume: stop a run (signal, kill during a checkpoint write), continue it, and it ends
exactly where the uninterrupted run ends. Bad resume requests end in one clear line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_layout
from helpers import tiny_run_config

import fervit.training.step as epoch_module  # the step draws the augmentation
import fervit.training.checkpoint as resume
from fervit.cli import main
from fervit.run_folder import LAST_DIR, LOCK_FILE
from fervit.training.checkpoint import MANIFEST, load_last
from fervit.training.lock import RunLock
from fervit.training.signals import EXIT_REQUEUE, Preempted
from fervit.training.trainer import train

EPOCHS = 4

# fixtures that take over 5 s to build: conftest marks every test that needs one slow
SLOW_FIXTURES = {"reference", "plateau_reference", "stopped_run"}


def config(root: Path, out: Path, *extra: str):
    """A tiny run that exercises every RNG consumer: augmentation, dropout, mixup's Beta draw, EMA."""
    return tiny_run_config(f"train.epochs={EPOCHS}", "train.batch_size=16", "model.dropout=0.1",
                           "augment.mixup_alpha=0.2", "optim.ema_decay=0.9", *extra, root=root, output=out)


def outcome(run_dir: Path) -> dict:
    """What must match between runs: every metric row (without wall time) and the final evaluation."""
    res = json.loads((run_dir / "results.json").read_text())
    rows = (run_dir / "training_metrics.csv").read_text().splitlines()
    return {"rows": [r.rsplit(",", 1)[0] for r in rows], "val": res["val"], "test": res["test"],
            "best_epoch": res["best_epoch"], "epochs": res["epochs_completed"]}


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("resume") / "fer", per_class=6)


@pytest.fixture(scope="module")
def reference(layout) -> dict:
    """The uninterrupted run every interrupted one is compared with."""
    return outcome(train(config(layout, layout.parent / "reference"), quiet=True))


def signal_during_epoch(monkeypatch, epoch: int, signum=signal.SIGUSR1, times: int = 1) -> None:
    """Send `signum` to this process `times` times in the middle of `epoch` (between its augmentation calls)."""
    calls = {"n": 0}
    augment = epoch_module.augment_batch
    steps_per_epoch = 35 // 16  # 6 faces x 7 classes, one per class held out for validation, batches of 16

    def augment_and_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == (epoch - 1) * steps_per_epoch + 2:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return augment(*args, **kwargs)

    monkeypatch.setattr(epoch_module, "augment_batch", augment_and_signal)


@pytest.mark.slow
def test_signal_mid_epoch_finishes_the_epoch_checkpoints_and_resumes_exactly(layout, reference, monkeypatch,
                                                                            tmp_path):
    signal_during_epoch(monkeypatch, epoch=2)
    with pytest.raises(Preempted) as stop:
        train(config(layout, tmp_path), quiet=True)
    run_dir = stop.value.run_dir
    assert stop.value.epoch == 2 and load_last(run_dir).epoch == 2
    assert not (run_dir / "results.json").exists()
    monkeypatch.undo()
    train(config(layout, tmp_path), quiet=True, run_dir=run_dir, resume=True)
    assert outcome(run_dir) == reference
    assert load_last(run_dir).epoch == EPOCHS  # a finished run keeps its resume state, to be trained further


@pytest.mark.slow
def test_second_signal_abandons_the_epoch_and_the_previous_checkpoint_resumes_exactly(layout, reference,
                                                                                     monkeypatch, tmp_path):
    signal_during_epoch(monkeypatch, epoch=3, signum=signal.SIGTERM, times=2)
    with pytest.raises(Preempted):
        train(config(layout, tmp_path), quiet=True)
    (run_dir,) = tmp_path.iterdir()
    assert load_last(run_dir).epoch == 2
    monkeypatch.undo()
    train(config(layout, tmp_path), quiet=True, run_dir=run_dir, resume=True)
    assert outcome(run_dir) == reference


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no handler catches it."""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_valid(layout, reference, monkeypatch,
                                                                            tmp_path):
    write_json = resume.write_json

    def killed_at_epoch_3_manifest(path, obj):
        if Path(path).name == MANIFEST and obj["epoch"] == 3:
            raise Killed
        write_json(path, obj)

    monkeypatch.setattr(resume, "write_json", killed_at_epoch_3_manifest)
    with pytest.raises(Killed):
        train(config(layout, tmp_path), quiet=True)
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / LAST_DIR / "e0003.safetensors").is_file()  # written, but never committed by a manifest
    assert load_last(run_dir).epoch == 2
    monkeypatch.undo()
    train(config(layout, tmp_path), quiet=True, run_dir=run_dir, resume=True)
    assert outcome(run_dir) == reference


HOLD_IN_EPOCH_2 = """
import sys, time
from pathlib import Path

import fervit.training.step as step
from fervit.cli import main

held, go = Path(sys.argv[1]), Path(sys.argv[2])
augment, calls = step.augment_batch, [0]

def augment_held(*args, **kwargs):  # epoch 1 done and checkpointed: hold epoch 2's first batch until told
    calls[0] += 1
    if calls[0] == 35 // 16 + 1:
        held.touch()
        while not go.exists():
            time.sleep(0.01)
    return augment(*args, **kwargs)

step.augment_batch = augment_held
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_to_the_cli_exits_for_requeue_and_resume_finishes_the_run(layout, tmp_path):
    out, held, go = tmp_path / "runs", tmp_path / "held", tmp_path / "go"
    argv = ["train", "--preset", "tiny", "--data", str(layout), "--cache-dir", str(layout.parent / "cache"),
            "--output", str(out), "--device", "cpu", "--epochs", "4", "--quiet", "--set", "train.threads=1",
            "--set", "train.batch_size=16"]
    proc = subprocess.Popen([sys.executable, "-c", HOLD_IN_EPOCH_2, str(held), str(go), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # only a hung child reaches it; the signal never races the run's end
    while not held.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert held.exists() and proc.poll() is None, "the run never reached epoch 2"
    proc.send_signal(signal.SIGTERM)  # delivered while the child waits: it is in epoch 2 when it sees it
    go.touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err
    (run_dir,) = out.iterdir()
    assert "fervit train --resume" in err and load_last(run_dir).epoch == 2  # epoch 2 finished, then it stopped
    assert not (run_dir / "results.json").exists()
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert json.loads((run_dir / "results.json").read_text())["epochs_completed"] == 4


@pytest.mark.slow
def test_a_run_finished_by_ctrl_c_resumes_exactly(layout, reference, monkeypatch, tmp_path):
    augment = epoch_module.augment_batch
    calls = {"n": 0}

    def interrupt_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * (35 // 16) + 1:
            raise KeyboardInterrupt
        return augment(*args, **kwargs)

    monkeypatch.setattr(epoch_module, "augment_batch", interrupt_in_epoch_3)
    run_dir = train(config(layout, tmp_path), quiet=True)
    assert json.loads((run_dir / "results.json").read_text())["interrupted"] and load_last(run_dir).epoch == 2
    monkeypatch.undo()
    train(config(layout, tmp_path), quiet=True, run_dir=run_dir, resume=True)
    assert outcome(run_dir) == reference


@pytest.fixture
def stopped_run(layout, monkeypatch, tmp_path) -> Path:
    signal_during_epoch(monkeypatch, epoch=1)
    with pytest.raises(Preempted) as stop:
        train(config(layout, tmp_path), quiet=True)
    monkeypatch.undo()
    return stop.value.run_dir


def run_dir_argv(run_dir: Path, layout: Path) -> list[str]:
    """The command line that starts `config`'s run in `run_dir`, and resumes it there (what Slurm requeues)."""
    settings = ["train.threads=1", "train.batch_size=16", "model.dropout=0.1", "augment.mixup_alpha=0.2",
                "optim.ema_decay=0.9"]
    argv = ["train", "--run-dir", str(run_dir), "--preset", "tiny", "--data", str(layout), "--cache-dir",
            str(layout.parent / "cache"), "--output", str(run_dir.parent), "--device", "cpu",
            "--epochs", str(EPOCHS), "--quiet"]
    return argv + [arg for s in settings for arg in ("--set", s)]


@pytest.mark.slow
def test_the_same_run_dir_command_line_resumes_a_stopped_run_exactly(stopped_run, layout, reference):
    assert main(run_dir_argv(stopped_run, layout)) == 0
    assert outcome(stopped_run) == reference


def test_resuming_a_damaged_checkpoint_is_one_clear_error(stopped_run, capsys):
    tensors = stopped_run / LAST_DIR / "e0001.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    assert main(["train", "--resume", str(stopped_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "damaged" in err and "checksum" in err


def test_resuming_with_another_recipe_is_refused(stopped_run, capsys):
    assert main(["train", "--resume", str(stopped_run), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "'optim.lr' is 0.5" in err and "keeps its recipe" in err


def test_resuming_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_resuming_with_another_number_of_processes_is_refused(stopped_run, layout, monkeypatch):
    from fervit.data.dataset import load_fer
    from fervit.errors import FervitError
    from fervit.training.distributed import DistContext

    cfg = config(layout, stopped_run.parent)
    data = load_fer(layout, layout.parent / "cache", progress=False)
    # the lock's, as rank 0 sees it
    monkeypatch.setattr("fervit.training.lock.broadcast_value", lambda value, ctx: value)
    with pytest.raises(FervitError, match="trained by 1 process"):  # refused before any other collective call
        train(cfg, quiet=True, data=data, run_dir=stopped_run, resume=True, ctx=DistContext(world_size=2))


# the issue-11 recipe: SGD with Nesterov momentum, plateau drops (patience 1, so they happen in 4 epochs), EMA warm-up
RECIPE = ("optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=1e-4", "optim.schedule=plateau",
          "optim.plateau_patience=1", "optim.warmup_epochs=1", "optim.ema_warmup=true")


@pytest.fixture(scope="module")
def plateau_reference(layout) -> dict:
    """The uninterrupted run of the issue-11 recipe."""
    return outcome(train(config(layout, layout.parent / "plateau_reference", *RECIPE), quiet=True))


def test_sgd_plateau_and_ema_warmup_resume_exactly(layout, plateau_reference, monkeypatch, tmp_path):
    signal_during_epoch(monkeypatch, epoch=3)
    with pytest.raises(Preempted) as stop:
        train(config(layout, tmp_path / "stopped", *RECIPE), quiet=True)
    monkeypatch.undo()
    train(config(layout, tmp_path / "stopped", *RECIPE), quiet=True, run_dir=stop.value.run_dir, resume=True)
    assert outcome(stop.value.run_dir) == plateau_reference


def test_a_checkpoint_written_before_the_sgd_plateau_and_ema_warmup_keys_still_resumes(tmp_path):
    from fervit.config import RunConfig, apply_overrides
    from fervit.errors import FervitError
    from fervit.training.recipe import check_config

    saved = RunConfig().to_dict()
    for key in ("name", "momentum", "nesterov", "schedule", "plateau_factor", "plateau_patience", "ema_warmup"):
        del saved["optim"][key]
    check_config(saved, RunConfig(), tmp_path)  # the missing keys mean what they meant then: the defaults
    with pytest.raises(FervitError, match="'optim.name' is 'sgd'"):
        check_config(saved, apply_overrides(RunConfig(), ["optim.name=sgd"]), tmp_path)


# --- one process per run folder: the lock ---

HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from fervit.training.distributed import DistContext
from fervit.training.lock import RunLock
lock = RunLock()
lock.acquire(Path(sys.argv[1]), DistContext())
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(stopped_run):
    """Another process that holds the stopped run's lock, as a process training into it does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(stopped_run)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("flag", ["--resume", "--run-dir", "--run-dir with another recipe"])
def test_a_run_folder_another_process_trains_into_is_refused_at_once_and_left_untouched(flag, stopped_run, holder,
                                                                                       layout, monkeypatch, capsys):
    import fervit.training.trainer as trainer

    def no_data_read(*args, **kwargs):
        raise AssertionError("the data was read before the lock was checked")

    monkeypatch.setattr(trainer, "load_data", no_data_read)
    before = snapshot(stopped_run)
    argv = ["train", "--resume", str(stopped_run), "--quiet"] if flag == "--resume" else run_dir_argv(stopped_run,
                                                                                                     layout)
    if flag.endswith("another recipe"):  # the folder being in use is what to say, not that the recipes differ
        argv += ["--set", "augment.translate=0.05"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"fervit: error: {stopped_run} is in use by another fervit process (PID "
                                       f"{holder.pid} on {socket.gethostname()}) that trains into it; wait for that "
                                       "one to end (or stop it), then run this again\n")
    assert snapshot(stopped_run) == before


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(stopped_run, holder):
    holder.kill()  # SIGKILL: the holder runs no cleanup; the kernel drops its lock
    holder.wait()
    assert main(["train", "--resume", str(stopped_run), "--quiet"]) == 0
    assert json.loads((stopped_run / "results.json").read_text())["epochs_completed"] == EPOCHS


def test_under_ddp_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    from fervit.training.distributed import DistContext

    # one process stands in for each rank
    monkeypatch.setattr("fervit.training.lock.broadcast_value", lambda value, ctx: value)
    RunLock().acquire(tmp_path, DistContext(rank=1, world_size=2))
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock().acquire(tmp_path, DistContext(rank=0, world_size=2))
    assert (tmp_path / LOCK_FILE).read_text() == f"PID {os.getpid()} on {socket.gethostname()}\n"


# --- --resume with --epochs N: train a run further ---

@pytest.fixture
def finished_run(layout, tmp_path) -> Path:
    """A run planned for 2 of the reference's 4 epochs, finished."""
    return train(config(layout, tmp_path, "train.epochs=2"), quiet=True)


def lr_column(rows: list[str]) -> list[str]:
    return [row.split(",")[1] for row in rows[1:]]


def test_resume_with_more_epochs_trains_a_finished_run_further_on_the_longer_cosine(finished_run, reference):
    assert main(["train", "--resume", str(finished_run), "--epochs", str(EPOCHS), "--quiet"]) == 0
    extended = outcome(finished_run)
    # epochs 3 and 4 follow the 4-epoch cosine; epoch 2 had followed the 2-epoch one
    assert lr_column(extended["rows"])[2:] == lr_column(reference["rows"])[2:]
    assert lr_column(extended["rows"])[1] != lr_column(reference["rows"])[1]
    res = json.loads((finished_run / "results.json").read_text())
    val_accs = [float(row.split(",")[5]) for row in extended["rows"][1:]]
    assert res["epochs_completed"] == res["epochs_planned"] == EPOCHS
    assert res["best_epoch"] == 1 + val_accs.index(max(val_accs))  # chosen on validation over the whole run
    assert res["val"]["accuracy"] == pytest.approx(res["best_val_acc"])  # results are the best epoch's model's
    assert json.loads((finished_run / "config.json").read_text())["train"]["epochs"] == EPOCHS


@pytest.mark.slow
def test_extending_a_finished_plateau_run_ends_exactly_where_the_longer_run_ends(layout, plateau_reference, tmp_path):
    run_dir = train(config(layout, tmp_path, *RECIPE, "train.epochs=2"), quiet=True)
    train(config(layout, tmp_path, *RECIPE), quiet=True, run_dir=run_dir, resume=True)  # 4 epochs
    assert outcome(run_dir) == plateau_reference


@pytest.mark.slow
def test_an_extension_stopped_by_a_signal_continues_to_the_new_total_on_a_plain_resume(finished_run, monkeypatch):
    signal_during_epoch(monkeypatch, epoch=1)  # the first epoch this process trains: epoch 3
    assert main(["train", "--resume", str(finished_run), "--epochs", str(EPOCHS), "--quiet"]) == EXIT_REQUEUE
    assert load_last(finished_run).epoch == 3
    # unfinished again: `fervit runs` and ship_model must not take the 2-epoch results for this run's
    assert not (finished_run / "results.json").exists()
    assert json.loads((finished_run / "results_at_epoch2.json").read_text())["epochs_completed"] == 2
    monkeypatch.undo()
    assert main(["train", "--resume", str(finished_run), "--quiet"]) == 0
    assert json.loads((finished_run / "results.json").read_text())["epochs_completed"] == EPOCHS


FINISHED = ("{run} has already finished (2 epochs; results.json is written); to train it further, give --epochs N "
            "with N above 2")


@pytest.mark.parametrize("epochs,message", [
    ([], FINISHED),
    (["--epochs", "2"], FINISHED),
    (["--epochs", "1"], "--epochs 1: {run} has trained 2 epochs already; give more than 2 to train it further"),
], ids=["no --epochs", "the same", "fewer"])
def test_resuming_a_finished_run_without_more_epochs_is_one_clear_line(finished_run, epochs, message, capsys):
    before = snapshot(finished_run)
    assert main(["train", "--resume", str(finished_run), "--quiet", *epochs]) == 2
    assert capsys.readouterr().err == f"fervit: error: {message.format(run=finished_run)}\n"
    before.pop(Path(LOCK_FILE))  # the refused process held the lock while it checked
    assert {k: v for k, v in snapshot(finished_run).items() if k != Path(LOCK_FILE)} == before


# --- a damaged or hand-edited checkpoint: one line that names the file ---

@pytest.fixture(scope="module")
def stopped_once(layout, tmp_path_factory) -> Path:
    return train(config(layout, tmp_path_factory.mktemp("stopped_once"), "train.epochs=1"), quiet=True)


@pytest.fixture
def damaged_run(stopped_once, tmp_path) -> Path:
    """A copy of a run whose `last/` is to be damaged; resumed with --epochs 2, so only the damage stops it."""
    return Path(shutil.copytree(stopped_once, tmp_path / stopped_once.name))


def edit_manifest(run_dir: Path, edit) -> None:
    path = run_dir / LAST_DIR / MANIFEST
    content = edit(json.loads(path.read_text()))
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())


def edit_state(run_dir: Path, edit) -> None:
    """Edit the state file as a careful hand would: the manifest gets its new checksum."""
    folder = run_dir / LAST_DIR
    manifest = json.loads((folder / MANIFEST).read_text())
    path = folder / manifest["files"]["state"]
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    manifest["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


MANIFEST_DAMAGE = [
    (lambda m: b"{not json", r"manifest\.json is not JSON \(.+\)"),
    (lambda m: bytes(range(256)), r"manifest\.json is not JSON \(.+\)"),
    (lambda m: [m], r"manifest\.json holds a list, not an object"),
    (lambda m: without(m, "sha256"), r"manifest\.json has no 'sha256'"),
    (lambda m: {**m, "files": list(m["files"].values())}, r"manifest\.json has 'files' as a list, not an object"),
    (lambda m: {**m, "epoch": "1"}, r"manifest\.json has 'epoch' as a string, not an integer"),
    (lambda m: {**m, "epoch": -1}, r"manifest\.json has 'epoch' -1, not 1 or more"),
    (lambda m: {**m, "format": "other/1"},
     r"manifest\.json is not a fervit resume manifest \(expected format fervit-resume/1\)"),
    (lambda m: {**m, "files": {**m["files"], "state": "../config.json"}},
     r"manifest\.json has 'files' naming '\.\./config\.json', not a file name inside last/"),
]
STATE_DAMAGE = [
    (lambda s: s["progress"].update(rows={}), r"e0001\.json has 'progress\.rows' as an object, not a list"),
    (lambda s: s["progress"].update(epoch=-1),
     r"e0001\.json has 'progress\.epoch' -1, not between 1 and 'progress\.epochs' \(1\)"),
    (lambda s: s["progress"].pop("best_acc"), r"e0001\.json has no 'progress\.best_acc'"),
    (lambda s: s["progress"]["rows"][0].pop("val_acc"), r"e0001\.json has no 'progress\.rows\[1\]\.val_acc'"),
    (lambda s: s["progress"]["rows"].append(s["progress"]["rows"][0]),
     r"e0001\.json has 2 rows in 'progress\.rows' for 1 epochs"),
    (lambda s: s.update(world_size=True), r"e0001\.json has 'world_size' as a boolean, not an integer"),
    (lambda s: s.update(progress=[]), r"e0001\.json has 'progress' as a list, not an object"),
    (lambda s: s["optimizer"].update(param_groups="all"),
     r"its optimiser or schedule state does not fit \(.+\)"),
]


@pytest.mark.parametrize("damage,problem", MANIFEST_DAMAGE + STATE_DAMAGE)
def test_a_hand_edited_checkpoint_is_one_line_naming_the_file_and_how_to_start_over(damaged_run, damage, problem,
                                                                                   capsys):
    if (damage, problem) in MANIFEST_DAMAGE:
        edit_manifest(damaged_run, damage)
    else:
        edit_state(damaged_run, damage)
    assert main(["train", "--resume", str(damaged_run), "--epochs", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    folder = re.escape(str(damaged_run / LAST_DIR))
    assert re.fullmatch(f"fervit: error: the checkpoint in {folder} is damaged: {problem}; delete {folder} to start "
                        "the run over from epoch 1\n", err), err


@pytest.mark.parametrize("kind", ["link to a file", "dangling link", "hard link"])
def test_a_lock_file_that_is_a_link_is_refused_and_never_written_through(kind, stopped_run, tmp_path, capsys):
    # issue 21: `ln -s FILE RUN/.lock` truncated FILE and wrote "PID n on host" into it
    target = tmp_path / "precious.txt"
    lock = stopped_run / LOCK_FILE
    lock.unlink(missing_ok=True)
    if kind != "dangling link":
        target.write_text("keep me\n")
    if kind == "hard link":
        os.link(target, lock)
    else:
        lock.symlink_to(target)
    before = snapshot(stopped_run)
    assert main(["train", "--resume", str(stopped_run), "--epochs", "5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fervit: error: {lock} is ") and "remove it and run this again" in err and "\n" not in err
    if kind == "dangling link":
        assert not target.exists()  # no file appears outside the run folder
    else:
        assert target.read_text() == "keep me\n"
    assert snapshot(stopped_run) == before


def read_only(monkeypatch, folder: Path, lock_too: bool = True) -> None:
    """Make `folder` refuse writes as a read-only folder does for a normal user (the tests run as root, whom
    chmod does not stop): new files, new folders and opening a file for writing fail with EACCES. With
    `lock_too=False` the existing .lock still opens, as when only the folder itself is read-only."""
    import errno
    import tempfile

    real_open, real_mkstemp, real_mkdir = os.open, tempfile.mkstemp, Path.mkdir
    inside = lambda p: Path(os.path.abspath(p)).is_relative_to(folder)  # noqa: E731

    def denied(p):
        return PermissionError(errno.EACCES, "Permission denied", str(p))

    def ro_open(p, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and inside(p) and (lock_too or Path(p).name != LOCK_FILE):
            raise denied(p)
        return real_open(p, flags, *args, **kwargs)

    def ro_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and inside(dir):
            raise denied(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def ro_mkdir(self, *args, **kwargs):
        if inside(self) and not self.exists():
            raise denied(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(tempfile, "mkstemp", ro_mkstemp)
    monkeypatch.setattr(Path, "mkdir", ro_mkdir)


# issue 21: a read-only run folder ended in a traceback
@pytest.mark.parametrize("lock_too, says", [(True, "cannot lock the run folder"), (False, "cannot write '")],
                         ids=["lock-refused", "lock-kept-writes-refused"])
def test_resuming_a_read_only_run_folder_is_one_line_and_changes_nothing(stopped_run, monkeypatch, capsys,
                                                                         lock_too, says):
    before = snapshot(stopped_run)
    read_only(monkeypatch, stopped_run, lock_too)
    assert main(["train", "--resume", str(stopped_run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fervit: error: ") and says in err and "Permission denied" in err and "\n" not in err, err
    monkeypatch.undo()
    after = snapshot(stopped_run)
    if not lock_too:  # a writable .lock is the one file a resume writes before anything else
        before.pop(Path(LOCK_FILE)), after.pop(Path(LOCK_FILE))
    assert after == before


@pytest.mark.parametrize("where", ["--output", "--run-dir"])
def test_a_new_run_under_a_read_only_folder_is_one_line(layout, tmp_path, monkeypatch, capsys, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    argv = run_dir_argv(ro / "run", layout)
    if where == "--output":
        i = argv.index("--run-dir")
        del argv[i:i + 2]
        argv[argv.index("--output") + 1] = str(ro)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fervit: error: cannot ") and "Permission denied" in err and "\n" not in err, err
    monkeypatch.undo()
    assert list(ro.iterdir()) == []
