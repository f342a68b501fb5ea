"""The `last` checkpoint of a run: written after every epoch, read back for an exact resume.

A checkpoint describes the state between two epochs: everything `train` needs to continue as if it had
never stopped (weights, EMA, optimiser and scheduler state, the RNG state of every rank, the metric rows
and the best-so-far). It is safetensors + JSON, never a pickle, in `RUN_DIR/last/`:

    e0007.safetensors       tensors: model, EMA, optimiser state, RNG states
    e0007.json              everything else: config, optimiser hyperparameters, scheduler, progress
    e0007.best.safetensors  the best model as of epoch 7 (a hard link to best_model.safetensors when
    e0007.best.json         the filesystem allows, a copy otherwise)
    manifest.json           written last, atomically: names the files above with their SHA-256

A kill at any moment leaves the previous manifest pointing at complete files, so a run can always resume.
A finished run keeps `last/`, so `--resume RUN --epochs N` can train it further.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fervit.config import RunConfig
from fervit.errors import FervitError
from fervit.io import atomic_write, write_json
from fervit.models.checkpoint import unwrap
from fervit.run_folder import LAST_DIR, METRIC_FIELDS, WEIGHTS
from fervit.training.distributed import DistContext, gather_tensors
from fervit.training.recipe import recipe_hash

FORMAT = "fervit-resume/1"
MANIFEST = "manifest.json"


# --- what a hand-edited checkpoint is checked against: the JSON keys and types of each file -------------

@dataclass
class ManifestFile:
    format: str
    epoch: int
    files: dict
    sha256: dict


@dataclass
class StateFile:
    config: dict
    world_size: int
    device_type: str
    data_fingerprint: str
    optimizer: dict
    scheduler: dict
    progress: dict


@dataclass
class Progress:
    """The trainer's TrainState as saved (a later field, such as `budgeted`, may be missing: it has a default)."""

    epochs: int
    epoch: int
    rows: list
    best_acc: float
    best_epoch: int
    stale: int
    stop_reason: str
    elapsed_s: float


JSON_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list"}


def _json_type(value) -> str:
    return "a boolean" if isinstance(value, bool) else "null" if value is None else JSON_NAMES.get(type(value), "?")


def _schema_problem(obj, schema, prefix: str = "") -> str:
    """What is wrong with the JSON value `obj` against `schema` (a dataclass of key: type, or a dict of the same;
    a float accepts an integer); '' when nothing."""
    if not isinstance(obj, dict):
        return f"has '{prefix[:-1]}' as {_json_type(obj)}, not an object" if prefix else \
            f"holds {_json_type(obj)}, not an object"
    fields = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else schema
    for key, kind in fields.items():
        if key not in obj:
            return f"has no '{prefix}{key}'"
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            return f"has '{prefix}{key}' as {_json_type(value)}, not {JSON_NAMES[kind]}"
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
    problem = _schema_problem(config.get("train"), {"epochs": int}, "config.train.")
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
        problem = _schema_problem(row, row_fields, f"progress.rows[{n}].")
        if problem:
            return problem
    if not 0 <= p["best_epoch"] <= p["epoch"] or p["stale"] < 0 or p["elapsed_s"] < 0:
        return (f"has 'progress.best_epoch' {p['best_epoch']}, 'progress.stale' {p['stale']} or "
                f"'progress.elapsed_s' {p['elapsed_s']} out of range")
    return ""


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
             fingerprint: str, soft: torch.Tensor | None = None) -> None:
        """Checkpoint the state after `progress['epoch']` epochs (`soft`: self-distillation's predictions).
        Collective under DDP (RNG states are gathered from every rank)."""
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
        if soft is not None:
            tensors["soft"] = soft
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
        best = run_dir / WEIGHTS
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
    problem = _schema_problem(manifest, ManifestFile) or _manifest_problem(manifest)
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
    problem = (_schema_problem(meta, StateFile) or _schema_problem(meta["progress"], Progress, "progress.")
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


def _prefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore(state: ResumeState, *, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer,
            scheduler, run_dir: Path, ctx: DistContext, soft: torch.Tensor | None = None) -> None:
    """Load weights, EMA, optimiser, scheduler and `soft` (self-distillation's predictions), and put the best
    model of that epoch back in place."""
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
        if soft is not None:
            soft.copy_(t["soft"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        folder = run_dir / LAST_DIR
        raise FervitError(f"the checkpoint in {folder} is damaged: its optimiser or schedule state does not fit "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); delete {folder} to "
                          "start the run over from epoch 1") from None
    if ctx.is_main and state.best_files is not None:
        best = run_dir / WEIGHTS
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
