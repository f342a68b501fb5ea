"""Optuna sweeps: workers share one study in a real database, and every trial is a normal run folder."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import make_layout
from helpers import tiny_run_config

from fervit.cli import main
from fervit.config import apply_overrides, load_preset
from fervit.errors import FervitError

optuna = pytest.importorskip("optuna", reason="the sweep extra is not installed: pip install 'fervit[sweep]'")

from fervit.sweep import apply_params, load_space, run_sweep  # noqa: E402  (needs optuna)

# small, fast models only: the default space reaches 384-wide, 8-deep ViTs
SPACE = {"optim.lr": {"low": 3e-4, "high": 3e-3, "log": True}, "model.dropout": {"low": 0.0, "high": 0.2},
         "optim.class_weights": {"choices": ["none", "balanced"]}, "augment.strength": {"low": 0.5, "high": 1.0}}
TRIAL_SETTINGS = ["train.threads=1", "train.batch_size=16", "train.epochs=2"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("sweep") / "fer", per_class=6)


def base_config(layout: Path):
    return tiny_run_config(*TRIAL_SETTINGS, root=layout)


@pytest.mark.slow
@pytest.mark.e2e
def test_two_workers_in_parallel_share_one_sqlite_study_and_both_trials_are_runs(layout, tmp_path, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    out = tmp_path / "sweeps"
    cmd = ["sweep", "--preset", "tiny", "--data", str(layout), "--cache-dir", str(layout.parent / "cache"),
           "--device", "cpu", "--space", str(space), "--output", str(out), "--study", "shared", "--trials", "2",
           "--workers", "2", "--quiet"]
    for setting in TRIAL_SETTINGS:
        cmd += ["--set", setting]
    # two worker processes at the same time, one trial each
    assert main(cmd) == 0
    assert json.loads(capsys.readouterr().out)["trials"] == 2
    assert sorted(p.name for p in (out / "shared").glob("worker*.log")) == ["worker0.log", "worker1.log"]
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{out / 'shared' / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    run_dirs = {Path(t.user_attrs["run_dir"]) for t in study.trials}
    assert len(run_dirs) == 2
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert json.loads((run_dir / "results.json").read_text())["best_val_acc"] == pytest.approx(trial.value)
        assert json.loads((run_dir / "trial.json").read_text())["trial"] == trial.number
    assert main(["runs", str(out)]) == 0
    table = capsys.readouterr().out
    assert all(run_dir.name in table for run_dir in run_dirs)


def test_a_pruned_trial_stops_early_and_still_leaves_a_run_folder(layout, tmp_path):
    cfg = apply_overrides(base_config(layout), ["train.epochs=3"])
    always = optuna.pruners.ThresholdPruner(lower=2.0)  # no accuracy reaches 2: every trial is pruned at once
    best = run_sweep(cfg, study_name="pruned", trials=1, space=SPACE, pruner=always, output=tmp_path)
    assert best["best"] is None
    study = optuna.load_study(study_name="pruned", storage=f"sqlite:///{tmp_path / 'pruned' / 'study.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    results = json.loads((Path(trial.user_attrs["run_dir"]) / "results.json").read_text())
    assert results["epochs_completed"] == 1 and results["stopped"].startswith("pruned")


@pytest.mark.slow
def test_a_retried_trial_whose_run_had_finished_is_recorded_without_training_again(layout, tmp_path, monkeypatch):
    cfg = base_config(layout)
    run_sweep(cfg, study_name="retry", trials=1, space=SPACE, output=tmp_path, quiet=True)
    storage = f"sqlite:///{tmp_path / 'retry' / 'study.db'}"
    (first,) = optuna.load_study(study_name="retry", storage=storage).trials
    # a worker killed after training, before the trial was recorded: the retry points at the finished run
    optuna.load_study(study_name="retry", storage=storage).enqueue_trial(
        first.params, user_attrs={"run_dir": first.user_attrs["run_dir"]})

    def no_training(*args, **kwargs):
        raise AssertionError("the finished run was trained again")

    monkeypatch.setattr("fervit.training.trainer.train", no_training)
    run_sweep(cfg, study_name="retry", trials=1, space=SPACE, output=tmp_path, quiet=True)
    trials = optuna.load_study(study_name="retry", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[1].value == trials[0].value and trials[1].user_attrs["run_dir"] == first.user_attrs["run_dir"]


def test_augment_strength_scales_every_augmentation_and_mlp_ratio_sets_the_mlp_width():
    base = load_preset("vit_cnn")
    cfg = apply_params(base, {"augment.strength": 0.5, "model.mlp_ratio": 3, "model.embed_dim": 96})
    assert cfg.augment.rotation == base.augment.rotation / 2 and cfg.augment.erase_p == base.augment.erase_p / 2
    assert cfg.augment.scale == (0.9, 1.0) and cfg.model.mlp_dim == 288
    assert base.augment.rotation == 10.0  # the base config is untouched


def test_a_space_with_an_unknown_key_fails_before_any_training(layout, tmp_path):
    with pytest.raises(FervitError, match="unknown config key 'model.depht'"):
        run_sweep(base_config(layout), space={"model.depht": {"low": 1, "high": 2}}, output=tmp_path)
    bad = tmp_path / "space.json"
    bad.write_text('{"optim.lr": [1, 2]}')
    with pytest.raises(FervitError, match="needs \"choices\""):
        load_space(bad)


# issue 21: each of these was a traceback (or a trial that trained on a value its key cannot mean)
@pytest.mark.parametrize("space, message", [
    ({"optim.lr": {"low": 1e-2, "high": 1e-4}}, "\"low\" (0.01) is above \"high\" (0.0001)"),
    ({"model.depth": {"low": 4, "high": 2}}, "\"low\" (4) is above \"high\" (2)"),
    ({"model.dropout": {"choices": [0.1, 1.5]}}, "can draw 1.5: config key 'model.dropout' must be"),
    ({"optim.label_smoothing": {"low": 0.0, "high": 2.0}}, "can draw 2.0: config key 'optim.label_smoothing'"),
    ({"optim.class_weights": {"choices": ["none", "inverse"]}}, "can draw 'inverse'"),
    ({"model.depth": {"choices": []}}, "\"choices\" must be a non-empty list, got []"),
    ({"model.depth": {"choices": 4}}, "\"choices\" must be a non-empty list, got 4"),
    ({"optim.lr": {"low": "a", "high": 1}}, "must be numbers"),
    ({"optim.lr": {"low": 0, "high": 1e-3, "log": True}}, "a log scale needs \"low\" above 0"),
    ({"augment.strength": {"low": -1, "high": 1}}, "is not a strength of 0 or more"),
    ({"model.mlp_ratio": {"choices": [0, 2]}}, "is not a ratio above 0"),
], ids=["lr-reversed", "depth-reversed", "choice-out-of-range", "high-out-of-range", "choice-not-a-name",
        "empty-choices", "choices-not-a-list", "bounds-not-numbers", "log-from-zero", "strength-negative",
        "mlp-ratio-zero"])
def test_a_space_that_cannot_be_drawn_from_is_one_line_before_anything_is_written(layout, tmp_path, capsys,
                                                                                    space, message):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    for workers in ("1", "2"):
        rc = main(["sweep", "--preset", "tiny", "--data", str(layout), "--device", "cpu", "--space", str(path),
                   "--output", str(tmp_path / "sweeps"), "--workers", workers])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "sweeps").exists()


def test_a_storage_that_is_not_a_database_url_is_one_clear_error(layout, tmp_path, capsys):
    code = main(["sweep", "--preset", "tiny", "--data", str(layout), "--storage", "not-a-url", "--output",
                 str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "not-a-url" in err and "\n" not in err


@pytest.fixture
def postgres_url():
    """A real PostgreSQL server from Debian's packages, on a free localhost port, for this test only."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    bindir = Path(bins[-1]) if bins else (Path(shutil.which("initdb")).parent if shutil.which("initdb") else None)
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("PostgreSQL server binaries not found; apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed: pip install 'fervit[sweep]'")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="fervit-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(data, pg.pw_uid, pg.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True, timeout=120)  # noqa: E731
    try:
        run(bindir / "initdb", "-D", data / "db", "-U", "fervit", "-A", "trust", "--no-sync")
        run(bindir / "pg_ctl", "-D", data / "db", "-l", data / "server.log", "-w", "-t", "60", "start", "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(data, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr.decode()[-500:]}")
    yield f"postgresql://fervit@127.0.0.1:{port}/postgres"
    run(bindir / "pg_ctl", "-D", data / "db", "-m", "immediate", "stop")
    shutil.rmtree(data, ignore_errors=True)


def test_a_study_in_postgresql_records_its_trials(layout, tmp_path, postgres_url):
    best = run_sweep(base_config(layout), study_name="pg", storage=postgres_url, trials=1, space=SPACE,
                     output=tmp_path)
    # fervit maps a bare postgresql:// to the installed psycopg2 driver; plain Optuna needs it spelt out
    study = optuna.load_study(study_name="pg", storage=postgres_url.replace("postgresql:", "postgresql+psycopg2:"))
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and best["best"]["trial"] == trial.number
    assert (Path(trial.user_attrs["run_dir"]) / "results.json").is_file()
