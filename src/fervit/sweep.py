"""Hyperparameter sweeps with Optuna: each trial is a normal run folder, the study lives in a database.

The storage is any SQLAlchemy URL: a local SQLite file by default, PostgreSQL when many workers (processes,
machines, Slurm array tasks) share one study. Weak trials are pruned on validation accuracy once the
learning-rate warmup is over. A trial stopped by SIGTERM/SIGUSR1 is queued again with its run folder, and
the worker that picks it up resumes that run exactly instead of starting over.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import random
import time
import warnings
from pathlib import Path

from fervit.config import RunConfig, apply_overrides
from fervit.data.location import resolve_data_root
from fervit.errors import FervitError
from fervit.run_folder import Trial, has_results, make_run_dir, read_results, write_trial
from fervit.training.distributed import DistContext
from fervit.training.checkpoint import has_checkpoint
from fervit.training.signals import Preempted, StopSignals

# The ranges the original project explored by hand. Keys are config keys, plus two derived ones:
# model.mlp_ratio (mlp_dim = ratio x embed_dim) and augment.strength (scales every augmentation amount).
# Every embed_dim here divides by every head count, so no combination is invalid.
DEFAULT_SPACE = {
    "model.patch_size": {"choices": [4, 6, 8, 12]},
    "model.embed_dim": {"choices": [96, 192, 288, 384]},
    "model.depth": {"low": 2, "high": 8},
    "model.num_heads": {"choices": [2, 3, 4, 6, 8]},
    "model.mlp_ratio": {"choices": [2, 3, 4]},
    "model.dropout": {"low": 0.0, "high": 0.3},
    "optim.lr": {"low": 1e-4, "high": 3e-3, "log": True},
    "optim.label_smoothing": {"low": 0.0, "high": 0.2},
    "optim.class_weights": {"choices": ["none", "balanced"]},
    "augment.strength": {"low": 0.0, "high": 1.5},
}
ONLY_FOR = {"model.patch_size": "vit_patch"}  # a key that only one model reads is not searched for the other
DERIVED = ("model.mlp_ratio", "augment.strength")


class InvalidTrial(FervitError):
    """The sampled values do not make a model; the trial fails and the sweep goes on."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise FervitError("fervit sweep needs Optuna and SQLAlchemy: pip install 'fervit[sweep]'") from None
    return optuna


def load_space(path: str | Path | None) -> dict:
    """The search space: DEFAULT_SPACE, or a JSON file of the same shape."""
    if path is None:
        return copy.deepcopy(DEFAULT_SPACE)
    p = Path(path)
    try:
        space = json.loads(p.read_text())
    except FileNotFoundError:
        raise FervitError(f"search space '{p}' does not exist") from None
    except json.JSONDecodeError as e:
        raise FervitError(f"search space '{p}' is not valid JSON: {e}") from None
    if not isinstance(space, dict) or not space:
        raise FervitError(f"search space '{p}' must be a JSON object of key -> {{choices}} or {{low, high}}")
    for key, spec in space.items():
        if not isinstance(spec, dict) or not ("choices" in spec or {"low", "high"} <= set(spec)):
            raise FervitError(f"search space entry '{key}' needs \"choices\": [...] or \"low\" and \"high\"")
        check_spec(key, spec)
    return space


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_spec(key: str, spec: dict) -> None:
    """A one-line error unless a space entry can be drawn from: a non-empty list of choices, or finite bounds
    with low <= high (and low > 0 on a log scale). Whether each value fits the key is `check_space`'s part."""
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise FervitError(f"search space entry '{key}': \"choices\" must be a non-empty list, got "
                              f"{json.dumps(spec['choices'])}")
        return
    low, high = spec["low"], spec["high"]
    if not (_number(low) and _number(high)):
        raise FervitError(f"search space entry '{key}': \"low\" and \"high\" must be numbers, got {low!r} and {high!r}")
    if low > high:
        raise FervitError(f"search space entry '{key}': \"low\" ({low}) is above \"high\" ({high})")
    if spec.get("log") and low <= 0:
        raise FervitError(f"search space entry '{key}': a log scale needs \"low\" above 0, got {low}")
    if "step" in spec and not (_number(spec["step"]) and spec["step"] > 0):
        raise FervitError(f"search space entry '{key}': \"step\" must be a number above 0, got {spec['step']!r}")


def suggest(trial, space: dict, base: RunConfig) -> dict:
    """One value per searched key, drawn by the trial's sampler."""
    params = {}
    for key, spec in space.items():
        if key in ONLY_FOR and base.model.name != ONLY_FOR[key]:
            continue
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=spec.get("log", False))
    return params


def apply_params(base: RunConfig, params: dict) -> RunConfig:
    """A copy of `base` with the trial's values, derived keys expanded into real config fields."""
    cfg = copy.deepcopy(base)
    if "augment.strength" in params:  # first, so that a trial's own augment.* values are kept as drawn
        cfg.augment = base.augment.scaled(params["augment.strength"])
    plain = {k: v for k, v in params.items() if k not in DERIVED}
    apply_overrides(cfg, [f"{k}={v}" for k, v in plain.items()])
    if "model.mlp_ratio" in params:
        cfg.model.mlp_dim = int(params["model.mlp_ratio"] * cfg.model.embed_dim)
    if cfg.model.embed_dim % cfg.model.num_heads:
        raise InvalidTrial(f"the search space allows embed_dim {cfg.model.embed_dim} with {cfg.model.num_heads} "
                          "heads, which do not divide; give dims that every head count divides")
    if cfg.model.name == "vit_patch" and cfg.model.img_size % cfg.model.patch_size:
        raise InvalidTrial(f"patch size {cfg.model.patch_size} does not divide the {cfg.model.img_size}px image")
    return cfg


def open_storage(url: str):
    """An Optuna RDB storage for `url`, with heartbeats so a worker that dies mid-trial (a hard kill) has
    its trial marked failed and retried by another worker."""
    optuna = _optuna()
    import sqlalchemy.exc

    kwargs = {}
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]  # SQLAlchemy 2.1 defaults to psycopg 3
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": 60}}  # workers queue for SQLite's single writer instead of failing
    # the retried trial inherits the user attributes, so it resumes the dead worker's run folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks heartbeats experimental and renamed the callback in 4.9
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
            stale = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
        else:
            stale = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=2)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=60, grace_period=180,
                                              **stale)
    except sqlalchemy.exc.ArgumentError:
        raise FervitError(f"'{url}' is not a database URL; use sqlite:///path/study.db or "
                          "postgresql://user@host:port/db") from None
    except ImportError as e:
        raise FervitError(f"cannot open the study database {url}: {str(e).splitlines()[0]}") from None


def open_study(name: str, url: str, pruner):
    """Create or join the study; workers that start together may race to create the tables, so retry."""
    optuna = _optuna()
    import sqlalchemy.exc

    for attempt in range(8):
        try:
            return optuna.create_study(study_name=name, storage=open_storage(url), direction="maximize",
                                       pruner=pruner, load_if_exists=True)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError,
                optuna.exceptions.DuplicatedStudyError) as e:
            if attempt == 7:
                raise FervitError(f"cannot open study '{name}' in {url}: {str(e).splitlines()[0]}") from None
            time.sleep(0.2 + random.random())


def study_folder(output: str | Path, study_name: str, storage: str | None) -> tuple[Path, str]:
    """The study's folder OUTPUT/STUDY/ (made), which holds its trials' run folders, and the study's storage URL:
    `storage`, else SQLite in that folder."""
    folder = Path(output) / study_name
    folder.mkdir(parents=True, exist_ok=True)
    return folder, storage or f"sqlite:///{folder.resolve() / 'study.db'}"


def run_sweep(base: RunConfig, *, study_name: str = "fervit", storage: str | None = None, trials: int = 20,
              max_study_trials: int = 0, timeout_s: float = 0, space: dict | None = None, pruner="median",
              output: str | Path = "runs/sweeps", quiet: bool = True, data=None) -> dict:
    """Run `trials` trials of the study (joined, or created) in this process; returns the study's best.

    `storage` defaults to `OUTPUT/STUDY/study.db` (SQLite); trials are run folders in `OUTPUT/STUDY/`.
    `max_study_trials` stops this worker once the whole study has that many finished trials.
    `pruner`: "median", "none", or an Optuna pruner. Raises Preempted when a stop signal ended a trial.
    """
    optuna = _optuna()
    from fervit.data.dataset import load_fer
    from fervit.device import resolve_device
    from fervit.training.trainer import train

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = DEFAULT_SPACE if space is None else space
    check_space(space, base)  # a misspelt key or a value out of range fails now, before anything is written
    folder, url = study_folder(output, study_name, storage)
    if pruner == "median":
        # before the lr warmup ends, accuracies say little about where a trial will end
        pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=math.ceil(base.optim.warmup_epochs))
    elif pruner == "none":
        pruner = optuna.pruners.NopPruner()
    study = open_study(study_name, url, pruner)
    if data is None:
        base.data.root = resolve_data_root(base.data.root)
        data = load_fer(base.data.root, base.data.cache_dir or None, base.data.strict, progress=not quiet)
    ctx = DistContext(device=resolve_device(base.train.device))  # a sweep worker is one process; many share a study

    def objective(trial) -> float:
        cfg = apply_params(base, suggest(trial, space, base))
        previous = trial.user_attrs.get("run_dir")  # set when a stopped trial was queued again
        # a finished run keeps its `last` checkpoint (to be extended): a worker killed after training but before
        # the trial was recorded leaves results.json, which the retry reads instead of training again
        finished = bool(previous) and has_results(previous)
        resume = bool(previous) and not finished and has_checkpoint(previous)
        run_dir = Path(previous) if resume or finished else make_run_dir(folder, cfg)
        trial.set_user_attr("run_dir", str(run_dir))

        def report(row: dict) -> str | None:
            trial.report(row["val_acc"], row["epoch"])
            return f"pruned by the sweep after epoch {row['epoch']}" if trial.should_prune() else None

        try:
            if not finished:
                train(cfg, quiet=True, data=data, run_dir=run_dir, resume=resume, ctx=ctx, on_epoch=report)
        except Preempted:
            trial.study.enqueue_trial(trial.params, user_attrs={"run_dir": str(run_dir)})
            raise
        results = read_results(run_dir)
        pruned = results.was_pruned
        write_trial(run_dir, Trial(study_name, _safe_url(url), trial.number, trial.params, pruned))
        if not quiet:
            print(f"trial {trial.number}: best val acc {results.best_val_acc:.4f}"
                  f"{' (pruned)' if pruned else ''} | {run_dir}", flush=True)
        if pruned:
            raise optuna.TrialPruned()
        return results.best_val_acc

    callbacks = []
    with StopSignals() as signals:  # a signal between trials: start no new one
        callbacks.append(lambda study, trial: study.stop() if signals.requested else None)
        if max_study_trials > 0:
            done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            callbacks.append(optuna.study.MaxTrialsCallback(max_study_trials, states=done))
        study.optimize(objective, n_trials=trials, timeout=timeout_s or None, callbacks=callbacks,
                       catch=(InvalidTrial,), gc_after_trial=True)
        if signals.requested:
            raise Preempted(f"{signals.requested}: stopped between trials; run the same `fervit sweep` command "
                            "to continue the study")
    return best_of(study)


def check_space(space: dict, base: RunConfig) -> None:
    """One-line errors for keys that are not config fields (or derived ones), and for any value the space can
    draw that its key refuses: every choice, and both bounds of a range (the config's RANGES are checked)."""
    for key, spec in space.items():
        check_spec(key, spec)
        values = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
        for value in values:
            if key in DERIVED:
                if not _number(value) or value < 0 or (key == "model.mlp_ratio" and value == 0):
                    raise FervitError(f"search space entry '{key}': {value!r} is not a "
                                      f"{'ratio above 0' if key == 'model.mlp_ratio' else 'strength of 0 or more'}")
                continue
            try:
                apply_overrides(copy.deepcopy(base), [f"{key}={value}"])
            except FervitError as e:
                raise FervitError(f"search space entry '{key}' can draw {value!r}: {e}") from None


def _safe_url(url: str) -> str:
    """The URL without a password, for files that others may read."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def best_of(study) -> dict:
    """The best finished trial: its number, validation accuracy, parameters and run folder."""
    try:
        best = study.best_trial
    except ValueError:
        return {"study": study.study_name, "trials": len(study.trials), "best": None}
    return {"study": study.study_name, "trials": len(study.trials),
            "best": {"trial": best.number, "val_acc": best.value, "params": best.params,
                     "run_dir": best.user_attrs.get("run_dir")}}
