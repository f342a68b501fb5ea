"""A run folder: the name of every file in it, and the one reader and writer of each.

    config.json                the RunConfig the run trains; `--resume --epochs N` rewrites train.epochs
    training_metrics.csv       one row per finished epoch (METRIC_FIELDS)
    best_model.safetensors     the best model so far, with its .json description (fervit.model_file)
    results.json               `Results`: written when the run finishes, updated by `fervit evaluate`
    results_at_epoch<N>.json   the results of a finished run that `--resume --epochs` trains further
    last/                      the checkpoint a resume continues from (fervit.training.checkpoint)
    .lock                      held (flock) while a process trains into the folder (`FolderLock`)
    trial.json                 `Trial`: the sweep trial that trained the run
    train.log                  the output of a job that `fervit train --seeds/--jobs` or a sweep started
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import socket
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fervit.config import RunConfig
from fervit.errors import FervitError
from fervit.io import atomic_write, make_folder, write_json
from fervit.model_file import WEIGHTS_NAME

try:
    import fcntl
except ImportError:  # Windows: no flock, so run folders are not locked there
    fcntl = None

CONFIG = "config.json"
METRICS = "training_metrics.csv"
WEIGHTS = WEIGHTS_NAME
RESULTS = "results.json"
LAST_DIR = "last"
LOCK_FILE = ".lock"
TRIAL = "trial.json"
LOG = "train.log"

METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
OPTIONAL_METRIC_FIELDS = ("test_acc",)  # train.log_test


# --- config.json -------------------------------------------------------------------------------------

def is_run_folder(run_dir: str | Path) -> bool:
    """Whether `fervit train` wrote this folder (it writes config.json first)."""
    return (Path(run_dir).expanduser() / CONFIG).is_file()


def read_config(run_dir: str | Path, action: str) -> RunConfig | None:
    """A run folder's config.json as a RunConfig; None when the folder has none; a one-line error naming
    `action` (e.g. "resume", "evaluate") when it is damaged or not a fervit config."""
    path = Path(run_dir).expanduser() / CONFIG
    if not path.is_file():
        return None
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FervitError(f"cannot {action} '{path.parent}': its config.json is damaged ({e}); it says which "
                          "data, protocol and model the run used") from None
    except FervitError as e:
        raise FervitError(f"cannot {action} '{path.parent}': its config.json does not fit this fervit ({e})") from None


def config_to_resume(run_dir: str | Path) -> RunConfig:
    """The config.json of a run folder to resume, or a one-line error saying why this is not a run folder."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FervitError(f"cannot resume '{run_dir}': no such folder; give a run folder written by `fervit train`")
    cfg = read_config(run_dir, "resume")
    if cfg is None:
        raise FervitError(f"cannot resume '{run_dir}': it has no config.json, so it is not a run folder written "
                          "by `fervit train`")
    return cfg


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    write_json(Path(run_dir) / CONFIG, cfg.to_dict())


def make_run_dir(output: str | Path, cfg: RunConfig) -> Path:
    """runs/<YYYYmmdd_HHMMSS>_<model>_ed<dim>_d<depth>_h<heads>_lr<lr>/ (a timm backbone: _timm_<backbone>_in<size>_lr<lr>/),
    made unique with a suffix."""
    m = cfg.model
    if m.name == "timm":
        shape = f"{m.backbone.replace('/', '-')}_in{m.input_size or m.img_size}"
    else:
        shape = f"ed{m.embed_dim}_d{m.depth}_h{m.num_heads}"
    base = f"{time.strftime('%Y%m%d_%H%M%S')}_{m.name}_{shape}_lr{cfg.optim.lr:g}"
    out = make_folder(output)
    for n in range(1, 1000):
        path = out / (base if n == 1 else f"{base}_{n}")
        try:
            return make_folder(path, exist_ok=False)
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a unique run folder under {out}")


# --- training_metrics.csv ----------------------------------------------------------------------------

def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Rewrite the metrics file whole, so that it always holds exactly the epochs `rows` says were trained."""
    buf = io.StringIO()
    extra = tuple(k for k in OPTIONAL_METRIC_FIELDS if rows and k in rows[0])
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + extra, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_write(Path(run_dir) / METRICS, "w") as f:
        f.write(buf.getvalue())


def read_metrics_csv(path: Path) -> list[dict]:
    """The rows of a training_metrics.csv; a one-line error naming the line when it is damaged."""
    line = 1
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not set(METRIC_FIELDS[:1] + METRIC_FIELDS[2:6]) <= set(reader.fieldnames or ()):
                raise ValueError(f"its header is {reader.fieldnames}, expected {','.join(METRIC_FIELDS)}")
            rows = []
            for row in reader:
                line = reader.line_num
                rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()})
            return rows
    except (ValueError, TypeError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
        raise FervitError(f"'{path}' is damaged (line {line}: {e}); the metrics of each epoch cannot be read") \
            from None


def read_metrics(run_dir: str | Path) -> list[dict] | None:
    """The run's metrics rows; None before the first epoch wrote the file."""
    path = Path(run_dir) / METRICS
    return read_metrics_csv(path) if path.is_file() else None


def progress_line(run_dir: str | Path) -> str:
    """'epoch 3/60, val acc 0.512' for a run in progress, or '' before its first epoch (or when unreadable:
    a progress display must not fail the job it shows)."""
    try:
        rows = read_metrics(run_dir)
        cfg = read_config(run_dir, "show the progress of")
    except (OSError, FervitError):
        return ""
    if not rows or cfg is None:
        return ""
    return f"epoch {rows[-1]['epoch']}/{cfg.train.epochs}, val acc {rows[-1]['val_acc']:.3f}"


# --- results.json ------------------------------------------------------------------------------------

class DamagedResults(FervitError):
    """results.json is not JSON, or not a JSON object."""


@dataclass
class Results:
    """results.json. `fervit train` writes every field (those after `torch` when they apply); `fervit evaluate`
    writes the description fields and the split it measured. Keys this fervit does not know stay in `other`
    and are written back, so that a rewrite loses nothing."""

    model: str | None = None
    params: int | None = None
    protocol: str | None = None
    data_root: str | None = None
    split_sizes: dict | None = None
    classes: list | None = None
    epochs_completed: int | None = None
    epochs_planned: int | None = None
    best_val_acc: float | None = None
    tta: str | None = None  # training's setting; `fervit evaluate` moves it into each split's section
    device: str | None = None
    torch: str | None = None
    best_epoch: int | None = None
    interrupted: bool | None = None
    wall_seconds: float | None = None
    runtime: dict | None = None  # precision, memory layout and threads chosen, and why
    stopped: str | None = None  # why training stopped before its planned epochs (early stop, the sweep's pruner)
    world_size: int | None = None  # under DDP
    checkpoint: str | list | None = None  # what `fervit evaluate` measured (a list: an ensemble)
    val: dict | None = None  # split_report() of the validation split, with the "tta" it used
    test: dict | None = None
    single_view: dict | None = None  # with train.tta on: {"val": acc, "test": acc} from one view, as predict scores
    calibration: dict | None = None
    other: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> Results:
        known = {f.name for f in dataclasses.fields(cls)} - {"other"}
        return cls(**{k: v for k, v in d.items() if k in known}, other={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "other"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.other}

    @property
    def was_pruned(self) -> bool:
        return (self.stopped or "").startswith("pruned")

    def split_tta(self, split: str) -> str:
        """The test-time augmentation a split's numbers used (a file from before splits said so: training's)."""
        section = getattr(self, split) or {}
        return str(section.get("tta", self.tta if self.tta is not None else "none")).lower()


def has_results(run_dir: str | Path) -> bool:
    """Whether the run finished (or `fervit evaluate` measured it)."""
    return (Path(run_dir) / RESULTS).is_file()


def read_results(run_dir: str | Path) -> Results | None:
    """The run's results.json; None when there is none; DamagedResults when it is not a JSON object."""
    path = Path(run_dir) / RESULTS
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DamagedResults(f"'{path}' is damaged or not a fervit results file ({e})") from None
    if not isinstance(data, dict):
        raise DamagedResults(f"'{path}' is not a fervit results file (not a JSON object)")
    return Results.from_dict(data)


def write_results(run_dir: str | Path, results: Results) -> Path:
    path = Path(run_dir) / RESULTS
    write_json(path, results.to_dict())
    return path


def set_results_aside(run_dir: Path, epoch: int) -> None:
    """A finished run trained further is unfinished again: its results move to results_at_epoch<N>.json."""
    path = Path(run_dir) / RESULTS
    if path.is_file():
        path.replace(path.with_name(f"results_at_epoch{epoch}.json"))


# --- trial.json --------------------------------------------------------------------------------------

@dataclass
class Trial:
    """The sweep trial that trained a run: its study, the study's storage (no password), number and values."""

    study: str
    storage: str
    trial: int
    params: dict
    pruned: bool


def write_trial(run_dir: Path, trial: Trial) -> None:
    write_json(Path(run_dir) / TRIAL, dataclasses.asdict(trial))


def read_trial(run_dir: str | Path) -> Trial | None:
    path = Path(run_dir) / TRIAL
    if not path.is_file():
        return None
    try:
        return Trial(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise FervitError(f"'{path}' is damaged or not a fervit trial file ({e})") from None


# --- .lock -------------------------------------------------------------------------------------------

class FolderLock:
    """An advisory lock (flock) on `RUN_DIR/.lock`, so that a second process training into the same folder
    stops at once instead of writing over the first.

    The kernel drops the lock when the process ends, however it ends, so a crash leaves no stale lock. It needs
    a filesystem with working flock: local disks, NFSv4 and NFSv3 with lockd (Linux maps flock to NFS byte-range
    locks), Lustre mounted with `-o flock`; an NFS mount with `nolock` or `local_lock=flock` locks only within
    one machine. Where flock fails outright, this warns and the folder stays unlocked.
    """

    def __init__(self):
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def take(self, run_dir: Path) -> str:
        """'' once locked (or where locks do not work); else the one-line error that names the holder."""
        if fcntl is None:
            return ""
        path = run_dir / LOCK_FILE
        try:
            # O_NOFOLLOW: a .lock that is a symbolic link (dangling or not) is refused, never followed, so its
            # target is not truncated and no file appears outside the run folder
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0),
                         0o666)
        except OSError as e:
            if path.is_symlink():
                return (f"{path} is a symbolic link, which fervit does not follow (it would overwrite what it points "
                        "to); remove it and run this again")
            return f"cannot lock the run folder {run_dir} ({e.strerror}); training needs to write in it"
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a FIFO or device; or a hard link to another file
            os.close(fd)
            what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "a special file"
            return f"{path} is not a plain file of this run folder ({what}); remove it and run this again"
        f = os.fdopen(fd, "r+", encoding="utf-8", errors="replace")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "PID unknown"  # the holder writes its PID just after it locks
            f.close()
            return (f"{run_dir} is in use by another fervit process ({holder}) that trains into it; wait for that "
                    "one to end (or stop it), then run this again")
        except OSError as e:
            f.close()
            warnings.warn(f"cannot lock {run_dir} ({e.strerror}): this filesystem has no working flock, so nothing "
                          "stops a second process from training into the same folder", stacklevel=3)
            return ""
        f.truncate()
        f.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return ""

    def release(self) -> None:
        """Drop the lock (closing the file drops it); the file stays, so no other process can lock a stale copy."""
        if self._file is not None:
            self._file.close()
            self._file = None
