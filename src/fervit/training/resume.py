"""Exact resume: the `last` checkpoint of a run, and the signals that ask training to stop for a requeue.

A checkpoint describes the state between two epochs: everything `train` needs to continue as if it had
never stopped (weights, EMA, optimiser and scheduler state, the RNG state of every rank, the metric rows
and the best-so-far). It is safetensors + JSON, never a pickle, in `RUN_DIR/last/`:

    e0007.safetensors       tensors: model, EMA, optimiser state, RNG states
    e0007.json              everything else: config, optimiser hyperparameters, scheduler, progress
    e0007.best.safetensors  the best model as of epoch 7 (a hard link to best_model.safetensors when
    e0007.best.json         the filesystem allows, a copy otherwise)
    manifest.json           written last, atomically: names the files above with their SHA-256

A kill at any moment leaves the previous manifest pointing at complete files, so a run can always resume.
A finished run keeps `last/`, so `--resume RUN --epochs N` can train it further. While a process trains into
a run folder it holds an advisory lock on `RUN_DIR/.lock` (RunLock), so a second one is refused at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fervit.config import RunConfig
from fervit.errors import FervitError
from fervit.io import atomic_write, write_json
from fervit.run_folder import LAST_DIR, LOCK_FILE, METRIC_FIELDS, FolderLock, has_results
from fervit.models.checkpoint import WEIGHTS_NAME, unwrap
from fervit.training.distributed import DistContext, broadcast_value, gather_tensors

FORMAT = "fervit-resume/1"
MANIFEST = "manifest.json"
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later"; the Slurm scripts requeue the job on it
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # Slurm: preemption, and `--signal=USR1@<s>` before the time limit
# config keys that say where, how fast or how long to run, not what to compute: a resumed run may change them
# (train.epochs extends or re-plans the run: the trainer's `extend`)
FREE_KEYS = frozenset({"data.root", "data.cache_dir", "data.strict", "train.output", "train.threads",
                       "train.channels_last", "train.device", "train.compile", "train.eval_batch_size", "train.epochs"})
# the keys (and JSON types) a checkpoint's manifest, state file and progress must hold: a hand edit is checked
MANIFEST_FIELDS = {"format": str, "epoch": int, "files": dict, "sha256": dict}
STATE_FIELDS = {"config": dict, "world_size": int, "device_type": str, "data_fingerprint": str, "optimizer": dict,
                "scheduler": dict, "progress": dict}
PROGRESS_FIELDS = {"epochs": int, "epoch": int, "rows": list, "best_acc": float, "best_epoch": int, "stale": int,
                   "stop_reason": str, "elapsed_s": float}
JSON_TYPES = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list"}


class Preempted(Exception):
    """Training stopped on a signal after its `last` checkpoint was written; `fervit train --resume` continues."""

    def __init__(self, message: str, run_dir: Path | None = None, epoch: int | None = None):
        super().__init__(message)
        self.run_dir, self.epoch = run_dir, epoch


class StopNow(Exception):
    """A second stop signal: abandon the epoch in flight; the previous epoch's checkpoint stays valid."""


class StopSignals:
    """While active, the first SIGTERM/SIGUSR1 asks training to stop at the end of the epoch in flight
    (`requested` names the signal); a second one raises StopNow at once.

    Handlers are only installed from the main thread (Python's rule); elsewhere signals keep their default.
    """

    def __init__(self):
        self.requested: str = ""
        self.run_dir: Path | None = None  # set once known, for the message of a stop mid-epoch
        self._previous: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            raise StopNow(name)
        self.requested = name
        print(f"fervit: {name} received: finishing this epoch, saving a checkpoint, then exiting "
              f"(send it again to stop at once)", flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class RunLock:
    """The run folder's lock (run_folder.FolderLock), taken by rank 0 alone for every rank of a DDP run."""

    def __init__(self):
        self._lock = FolderLock()

    def acquire(self, run_dir: str | Path | None, ctx: DistContext) -> None:
        """Take the lock on `run_dir` unless held already (a folder that does not exist yet is left for a later
        call). Collective under DDP: only rank 0 locks, and every rank raises its one-line error."""
        error = ""
        if ctx.is_main and not self._lock.held and run_dir is not None and Path(run_dir).is_dir():
            error = self._lock.take(Path(run_dir))
        error = broadcast_value(error, ctx)
        if error:
            raise FervitError(error)

    def release(self) -> None:
        self._lock.release()


@dataclass
class ResumeState:
    """A loaded `last` checkpoint: the JSON part as read, the tensors, and where the best model lies."""

    meta: dict
    tensors: dict[str, torch.Tensor]
    best_files: tuple[Path, Path] | None
    progress: dict = field(init=False)

    def __post_init__(self):
        self.progress = self.meta["progress"]

    @property
    def epoch(self) -> int:
        return int(self.progress["epoch"])

    @property
    def planned_epochs(self) -> int:
        """train.epochs in the config the checkpoint was written with."""
        return int(self.meta["config"]["train"]["epochs"])


def recipe(cfg_dict: dict) -> dict:
    """The config without FREE_KEYS: what must be identical for a resume to be exact."""
    return {section: {k: v for k, v in values.items() if f"{section}.{k}" not in FREE_KEYS}
            for section, values in cfg_dict.items()}


def recipe_hash(cfg: RunConfig) -> str:
    text = json.dumps(recipe(cfg.to_dict()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_config(saved: dict, cfg: RunConfig, run_dir: Path) -> None:
    """Raise a one-line FervitError naming the first recipe key that differs from the checkpoint's config
    (train.epochs may differ: that extends or re-plans the run)."""
    with contextlib.suppress(FervitError):  # keys added to the config since then take their (old-behaviour) defaults
        saved = RunConfig.from_dict(saved).to_dict()
    saved_recipe = json.loads(json.dumps(recipe(saved)))
    new_recipe = json.loads(json.dumps(recipe(cfg.to_dict())))
    for section in sorted(set(saved_recipe) | set(new_recipe)):
        old, new = saved_recipe.get(section, {}), new_recipe.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise FervitError(f"'{section}.{key}' is {new.get(key)!r} but {run_dir} was trained with "
                                  f"{old.get(key)!r}; a resumed run keeps its recipe (only "
                                  f"{', '.join(sorted(FREE_KEYS))} may change)")


def data_fingerprint(labels: torch.Tensor, splits) -> str:
    """A short hash of the labels and the split indices: a resumed run must see the same examples."""
    h = hashlib.blake2b(digest_size=12)
    for t in (labels, splits.train, splits.val, splits.test):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def rng_tensors(gen: torch.Generator, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG (CPU, and CUDA on GPUs) plus the shared data/augmentation generator.

    Collective under DDP: every rank must call it."""
    out = {"rng/generator": gen.get_state().clone()}
    for rank, state in enumerate(gather_tensors(torch.get_rng_state(), ctx)):
        out[f"rng/cpu/{rank}"] = state
    if ctx.device.type == "cuda":
        for rank, state in enumerate(gather_tensors(torch.cuda.get_rng_state(ctx.device), ctx)):
            out[f"rng/cuda/{rank}"] = state
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        dst.unlink()
    try:
        os.link(src, dst)  # best_model.* are replaced by rename, so the link keeps this epoch's version
    except OSError:
        shutil.copyfile(src, dst)


class CheckpointWriter:
    """Writes `last` checkpoints on a background thread, so training does not wait for the disk.

    `save` copies the state synchronously (so the next step cannot change what is written) and returns;
    `wait` joins the write in flight and re-raises its error. One write at a time; only rank 0 writes.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, run_dir: Path, ctx: DistContext, cfg: RunConfig, *, model: nn.Module, ema: nn.Module | None,
             optimizer: torch.optim.Optimizer, scheduler, gen: torch.Generator, progress: dict,
             fingerprint: str) -> None:
        """Checkpoint the state after `progress['epoch']` epochs. Collective under DDP (RNG states are
        gathered from every rank)."""
        rng = rng_tensors(gen, ctx)
        if not ctx.is_main:
            return
        self.wait()
        tensors = {f"model/{k}": v for k, v in unwrap(model).state_dict().items()}
        if ema is not None:
            tensors.update({f"ema/{k}": v for k, v in ema.state_dict().items()})
        opt = optimizer.state_dict()
        plain_state = {}
        for idx, entry in opt["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{idx}/{key}"] = value
                else:
                    plain_state.setdefault(str(idx), {})[key] = value
        tensors.update(rng)
        # a copy, not a view: training goes on updating these tensors in place while the thread writes
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        meta = json.loads(json.dumps({
            "format": FORMAT,
            "config": cfg.to_dict(),
            "recipe_hash": recipe_hash(cfg),
            "data_fingerprint": fingerprint,
            "world_size": ctx.world_size,
            "device_type": ctx.device.type,
            "torch": torch.__version__,
            "optimizer": {"param_groups": opt["param_groups"], "state": plain_state},
            "scheduler": scheduler.state_dict(),
            "progress": progress,
        }))
        folder = run_dir / LAST_DIR
        folder.mkdir(exist_ok=True)
        stem = f"e{int(progress['epoch']):04d}"
        files = {"tensors": f"{stem}.safetensors", "state": f"{stem}.json"}
        best = run_dir / WEIGHTS_NAME
        if best.is_file() and best.with_suffix(".json").is_file():
            # now, not in the thread: the next epoch may replace best_model.* before the thread runs
            files["best"], files["best_meta"] = f"{stem}.best.safetensors", f"{stem}.best.json"
            _link_or_copy(best, folder / files["best"])
            _link_or_copy(best.with_suffix(".json"), folder / files["best_meta"])
        self._thread = threading.Thread(target=self._write, args=(folder, files, tensors, meta),
                                        name="fervit-checkpoint")
        self._thread.start()

    def _write(self, folder: Path, files: dict, tensors: dict, meta: dict) -> None:
        try:
            blob = save(tensors, metadata={"format": FORMAT})
            text = json.dumps(meta, indent=2) + "\n"
            with atomic_write(folder / files["tensors"], "wb") as f:
                f.write(blob)
            with atomic_write(folder / files["state"], "w") as f:
                f.write(text)
            digests = {files["tensors"]: hashlib.sha256(blob).hexdigest(),
                       files["state"]: hashlib.sha256(text.encode()).hexdigest()}
            for key in ("best", "best_meta"):
                if key in files:
                    digests[files[key]] = _sha256(folder / files[key])
            manifest = {"format": FORMAT, "epoch": meta["progress"]["epoch"], "files": files, "sha256": digests}
            write_json(folder / MANIFEST, manifest)  # the commit point: before it the previous checkpoint counts
            keep = set(files.values()) | {MANIFEST}
            for stale in folder.iterdir():
                if stale.name not in keep and not stale.name.startswith("."):
                    stale.unlink(missing_ok=True)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise what it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / LAST_DIR / MANIFEST).is_file()


def load_last(run_dir: str | Path) -> ResumeState | None:
    """The run's `last` checkpoint, verified against its manifest; None when none was written yet.

    A damaged or hand-edited checkpoint (not JSON, wrong types, missing keys, values out of range, files that do
    not match their checksums) is a one-line error naming the file."""
    run_dir = Path(run_dir)
    folder = run_dir / LAST_DIR
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None

    def damaged(path: Path, problem: str) -> FervitError:
        return FervitError(f"the checkpoint in {folder} is damaged: {path.name} {problem}; delete {folder} to "
                           "start the run over from epoch 1")

    manifest = _read_json(manifest_path, damaged)
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
        raise damaged(manifest_path, f"is not a fervit resume manifest (expected format {FORMAT})")
    problem = _json_problem(manifest, MANIFEST_FIELDS) or _manifest_problem(manifest)
    if problem:
        raise damaged(manifest_path, problem)
    files, digests = manifest["files"], manifest["sha256"]
    for name in files.values():
        path = folder / name
        if not path.is_file():
            raise damaged(path, "is missing")
        if _sha256(path) != digests.get(name):
            raise damaged(path, "does not match its checksum (a partial copy or a disk error?)")
    state_path = folder / files["state"]
    meta = _read_json(state_path, damaged)
    problem = (_json_problem(meta, STATE_FIELDS) or _json_problem(meta["progress"], PROGRESS_FIELDS, "progress.")
               or _state_problem(meta))
    if not problem and meta["progress"]["epoch"] != manifest["epoch"]:
        problem = f"is the state after epoch {meta['progress']['epoch']}, but {MANIFEST} says {manifest['epoch']}"
    if problem:
        raise damaged(state_path, problem)
    try:
        tensors = load_file(folder / files["tensors"])
    except (SafetensorError, OSError) as e:
        raise damaged(folder / files["tensors"], f"cannot be read ({e})") from None
    best = (folder / files["best"], folder / files["best_meta"]) if "best" in files else None
    return ResumeState(meta, tensors, best)


def _read_json(path: Path, damaged):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a hand edit gone wrong, or bytes that are not text
        raise damaged(path, f"is not JSON ({e})") from None
    except OSError as e:
        raise damaged(path, f"cannot be read ({e.strerror})") from None


def _json_type(value) -> str:
    return "a boolean" if isinstance(value, bool) else "null" if value is None else JSON_TYPES.get(type(value), "?")


def _json_problem(obj, fields: dict, prefix: str = "") -> str:
    """What is wrong with the JSON object `obj` against `fields` (key -> type); '' when nothing."""
    if not isinstance(obj, dict):
        return f"has '{prefix[:-1]}' as {_json_type(obj)}, not an object" if prefix else \
            f"holds {_json_type(obj)}, not an object"
    for key, kind in fields.items():
        if key not in obj:
            return f"has no '{prefix}{key}'"
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            return f"has '{prefix}{key}' as {_json_type(value)}, not {JSON_TYPES[kind]}"
    return ""


def _manifest_problem(manifest: dict) -> str:
    files, digests = manifest["files"], manifest["sha256"]
    if manifest["epoch"] < 1:
        return f"has 'epoch' {manifest['epoch']}, not 1 or more"
    if not {"tensors", "state"} <= set(files) or ("best" in files) != ("best_meta" in files):
        return f"has 'files' {sorted(files)}, expected tensors, state and maybe best with best_meta"
    for name in files.values():  # plain names inside last/: a hand edit must not point anywhere else
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            return f"has 'files' naming {name!r}, not a file name inside {LAST_DIR}/"
        if not isinstance(digests.get(name), str):
            return f"has no SHA-256 for {name} in 'sha256'"
    return ""


def _state_problem(meta: dict) -> str:
    """Values out of range in the state file (its types are checked already)."""
    config, p = meta["config"], meta["progress"]
    if not all(isinstance(section, dict) for section in config.values()):
        return "has a 'config' section that is not an object"
    problem = _json_problem(config.get("train"), {"epochs": int}, "config.train.")
    if problem:
        return problem
    if meta["world_size"] < 1:
        return f"has 'world_size' {meta['world_size']}, not 1 or more"
    if not 1 <= p["epoch"] <= p["epochs"]:
        return f"has 'progress.epoch' {p['epoch']}, not between 1 and 'progress.epochs' ({p['epochs']})"
    if len(p["rows"]) != p["epoch"]:
        return f"has {len(p['rows'])} rows in 'progress.rows' for {p['epoch']} epochs"
    row_fields = dict.fromkeys(METRIC_FIELDS, float)
    for n, row in enumerate(p["rows"], 1):
        problem = _json_problem(row, row_fields, f"progress.rows[{n}].")
        if problem:
            return problem
    if not 0 <= p["best_epoch"] <= p["epoch"] or p["stale"] < 0 or p["elapsed_s"] < 0:
        return (f"has 'progress.best_epoch' {p['best_epoch']}, 'progress.stale' {p['stale']} or "
                f"'progress.elapsed_s' {p['elapsed_s']} out of range")
    return ""


def validate(state: ResumeState, cfg: RunConfig, ctx: DistContext, fingerprint: str, run_dir: Path) -> None:
    """One-line errors for a checkpoint that this process cannot continue exactly (its recipe is `check_config`'s)."""
    done, planned, p = state.epoch, state.planned_epochs, state.progress
    if cfg.train.epochs != planned:  # --epochs N: the trainer's `extend` re-plans the run to N epochs
        if cfg.train.epochs <= done:
            raise FervitError(f"--epochs {cfg.train.epochs}: {run_dir} has trained {done} epochs already; give more "
                              f"than {done} to train it further")
    elif has_results(run_dir) and (done >= p["epochs"] or p["stop_reason"]):
        how = f"{p['stop_reason']} after {done} epochs" if p["stop_reason"] else f"{done} epochs"
        raise FervitError(f"{run_dir} has already finished ({how}; results.json is written); to train it further, "
                          f"give --epochs N with N above {max(done, planned)}")
    if state.meta["world_size"] != ctx.world_size:
        raise FervitError(f"{run_dir} was trained by {state.meta['world_size']} process(es) and this is "
                          f"{ctx.world_size}; resume with the same number (e.g. torchrun --nproc-per-node "
                          f"{state.meta['world_size']}) so every rank gets its RNG state back")
    if state.meta["device_type"] != ctx.device.type:
        raise FervitError(f"{run_dir} was trained on {state.meta['device_type']} and this process uses "
                          f"{ctx.device.type}; resume with --device {state.meta['device_type']}")
    if state.meta["data_fingerprint"] != fingerprint:
        raise FervitError(f"the data at '{cfg.data.root}' is not the data {run_dir} was trained on (other "
                          "images, labels or splits); point --data at the original dataset")


def _prefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore(state: ResumeState, *, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer,
            scheduler, run_dir: Path, ctx: DistContext) -> None:
    """Load weights, EMA, optimiser and scheduler, and put the best model of that epoch back in place."""
    t = state.tensors
    try:
        unwrap(model).load_state_dict(_prefixed(t, "model/"))
        if ema is not None:
            ema.load_state_dict(_prefixed(t, "ema/"))
    except RuntimeError as e:
        raise FervitError(f"the checkpoint in {run_dir / LAST_DIR} does not fit this model "
                          f"({str(e).splitlines()[0]})") from None
    try:  # a hand-edited state file with the right checksum can still hold anything here
        live_groups = optimizer.state_dict()["param_groups"]
        groups = []
        for saved, live in zip(state.meta["optimizer"]["param_groups"], live_groups):
            # JSON turned tuples (betas) into lists; give them back their type
            groups.append({k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()})
        opt_state: dict[int, dict] = {}
        for key, value in _prefixed(t, "optim/").items():
            idx, name = key.split("/", 1)
            opt_state.setdefault(int(idx), {})[name] = value
        for idx, entry in state.meta["optimizer"]["state"].items():
            opt_state.setdefault(int(idx), {}).update(entry)
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        scheduler.load_state_dict(state.meta["scheduler"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        folder = run_dir / LAST_DIR
        raise FervitError(f"the checkpoint in {folder} is damaged: its optimiser or schedule state does not fit "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); delete {folder} to "
                          "start the run over from epoch 1") from None
    if ctx.is_main and state.best_files is not None:
        best = run_dir / WEIGHTS_NAME
        for src, dst in zip(state.best_files, (best, best.with_suffix(".json"))):
            with open(src, "rb") as f, atomic_write(dst, "wb") as out:
                shutil.copyfileobj(f, out)


def restore_rng(state: ResumeState, gen: torch.Generator, ctx: DistContext) -> None:
    """Put every RNG back where it was at the end of the checkpoint's epoch: the last step before training."""
    t = state.tensors
    gen.set_state(t["rng/generator"])
    torch.set_rng_state(t[f"rng/cpu/{ctx.rank}"])
    if ctx.device.type == "cuda":
        torch.cuda.set_rng_state(t[f"rng/cuda/{ctx.rank}"], ctx.device)
