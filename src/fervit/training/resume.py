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
from fervit.runs import read_run_config
from fervit.models.checkpoint import WEIGHTS_NAME, unwrap
from fervit.training.distributed import DistContext, gather_tensors

FORMAT = "fervit-resume/1"
LAST_DIR = "last"
MANIFEST = "manifest.json"
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later"; the Slurm scripts requeue the job on it
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # Slurm: preemption, and `--signal=USR1@<s>` before the time limit
# config keys that say where or how fast to run, not what to compute: a resumed run may change them
FREE_KEYS = frozenset({"data.root", "data.cache_dir", "data.strict", "train.output", "train.threads",
                       "train.device", "train.compile", "train.eval_batch_size"})


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


def recipe(cfg_dict: dict) -> dict:
    """The config without FREE_KEYS: what must be identical for a resume to be exact."""
    return {section: {k: v for k, v in values.items() if f"{section}.{k}" not in FREE_KEYS}
            for section, values in cfg_dict.items()}


def recipe_hash(cfg: RunConfig) -> str:
    text = json.dumps(recipe(cfg.to_dict()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_config(saved: dict, cfg: RunConfig, run_dir: Path) -> None:
    """Raise a one-line FervitError naming the first recipe key that differs from the checkpoint's config."""
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


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config.json of a run folder, or a one-line error saying why this is not a run folder."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FervitError(f"cannot resume '{run_dir}': no such folder; give a run folder written by `fervit train`")
    cfg = read_run_config(run_dir, "resume")
    if cfg is None:
        raise FervitError(f"cannot resume '{run_dir}': it has no config.json, so it is not a run folder written "
                          "by `fervit train`")
    return cfg


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
    """The run's `last` checkpoint, verified against its manifest; None when none was written yet."""
    run_dir = Path(run_dir)
    folder = run_dir / LAST_DIR
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None
    damaged = f"the checkpoint in {folder} is damaged"
    try:
        manifest = json.loads(manifest_path.read_text())
        files, digests = manifest["files"], manifest["sha256"]
        if manifest.get("format") != FORMAT:
            raise FervitError(f"{manifest_path} is not a fervit resume manifest (expected format {FORMAT})")
    except (json.JSONDecodeError, KeyError, TypeError):
        raise FervitError(f"{damaged}: {MANIFEST} is unreadable") from None
    for name in files.values():
        path = folder / name
        if not path.is_file():
            raise FervitError(f"{damaged}: {name} is missing")
        if _sha256(path) != digests.get(name):
            raise FervitError(f"{damaged}: {name} does not match its checksum (a partial copy or a disk error?)")
    try:
        meta = json.loads((folder / files["state"]).read_text())
        tensors = load_file(folder / files["tensors"])
    except (json.JSONDecodeError, SafetensorError, OSError, KeyError) as e:
        raise FervitError(f"{damaged}: {e}") from None
    best = (folder / files["best"], folder / files["best_meta"]) if "best" in files else None
    return ResumeState(meta, tensors, best)


def validate(state: ResumeState, cfg: RunConfig, ctx: DistContext, fingerprint: str, run_dir: Path) -> None:
    """One-line errors for a checkpoint that this process cannot continue exactly."""
    check_config(state.meta["config"], cfg, run_dir)
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


def remove_last(run_dir: Path) -> None:
    """Drop the `last` checkpoint of a finished run: its results are final, and it is 3x the model's size."""
    shutil.rmtree(run_dir / LAST_DIR, ignore_errors=True)
