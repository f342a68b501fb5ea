"""Classify the faces in photos: decode -> detect -> crop -> one forward pass per batch of images.

The pipeline is numpy from the decoded face to the probabilities, and torch is imported only for a PyTorch model:
with ONNX Runtime (an .onnx file, or the shipped model when the `onnx` extra is installed) a one-photo
`fervit predict` never loads torch, whose import alone takes 1.45 s on the 2-core machine.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from fervit.data.images import IMG_SIZE, normalize
from fervit.data.tta import log_softmax, mean_log_probs, tta_mode, tta_views
from fervit.errors import FervitError
from fervit.inference.faces import (MARGIN, MAX_PIXELS, Box, FaceDetector, ImageError, face_crop, is_face_crop,
                                    open_image, to_face, to_gray)
from fervit.model_file import WEIGHTS_NAME, ModelFile, find_checkpoint
from fervit.progress import progress_bar
from fervit.run_folder import METRICS, DamagedResults, has_results, read_results

DETECT_MODES = ("auto", "always", "never")  # auto: small images are face crops, larger ones are searched
RUNS_DIR = "runs"


@dataclass
class Face:
    """One classified face: where it is and the probability of every class."""

    box: Box
    probabilities: dict[str, float]

    @property
    def emotion(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)

    def to_dict(self) -> dict:
        return {"box": self.box.as_list(), "emotion": self.emotion,
                "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()}}


@dataclass
class ImageResult:
    """The outcome for one input: its faces (maybe none), or why it could not be read."""

    file: str
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    whole: bool = False  # classified as a face crop, without detection
    image: Image.Image | None = field(default=None, repr=False)  # the decoded image, kept only when asked

    def to_dict(self) -> dict:
        d = {"file": self.file, "faces": [f.to_dict() for f in self.faces]}
        if self.error is not None:
            d["error"] = self.error
        return d


def shipped_model() -> Path | None:
    """The model file bundled with the package (fervit/assets/model.safetensors), once one ships."""
    path = Path(str(resources.files("fervit"))) / "assets" / "model.safetensors"
    return path if path.is_file() else None


def shipped_onnx(path: Path) -> Path | None:
    """The shipped model's ONNX export (assets/model.onnx, written and checked against PyTorch by
    scripts/ship_model.py) when `path` is the shipped model and ONNX Runtime is installed, else None."""
    shipped = shipped_model()
    onnx_path = path.with_suffix(".onnx")
    if shipped is None or path.resolve() != shipped.resolve() or not onnx_path.is_file():
        return None
    try:
        import onnxruntime  # noqa: F401  (the `onnx` extra)
    except ImportError:
        return None
    return onnx_path


def newest_run(runs_dir: str | os.PathLike = RUNS_DIR) -> Path | None:
    """The most recently written best checkpoint under `runs_dir`, searched recursively."""
    root = Path(runs_dir)
    found = [p for p in root.rglob(WEIGHTS_NAME) if p.is_file()] if root.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


LAST = "last"  # --model last: the newest finished run


def newest_finished_run(runs_dir: str | os.PathLike = RUNS_DIR) -> Path | None:
    """The run folder under `runs_dir` (searched recursively) whose training ended last: it holds a best model and
    results.json (written when a run finishes). Ordered by its training_metrics.csv, written after every epoch,
    since `fervit evaluate` rewrites results.json later."""
    root = Path(runs_dir).expanduser()
    found = [p.parent for p in root.rglob(WEIGHTS_NAME)
             if p.is_file() and has_results(p.parent)] if root.is_dir() else []

    def ended(run: Path) -> int:
        metrics = run / METRICS
        return (metrics if metrics.is_file() else run / WEIGHTS_NAME).stat().st_mtime_ns

    return max(found, key=ended) if found else None


def resolve_model(model: str | os.PathLike | None, runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    """What --model names: a path as given, `last` (the newest finished run under `runs_dir`), or nothing (the
    default model)."""
    if model is None or str(model) == "":
        return default_model()
    if str(model) == LAST:
        run = newest_finished_run(runs_dir)
        if run is None:
            raise FervitError(f"--model {LAST}: no finished run under '{runs_dir}' (one with {WEIGHTS_NAME} and "
                              "results.json); train one with `fervit train`, name the folder runs go to with --runs "
                              "DIR, or give the run folder itself")
        return run
    return Path(model).expanduser()


def model_line(path: Path, meta: ModelFile) -> str:
    """One line saying which model answers: its file, name, epoch and the accuracies it recorded."""
    facts = [meta.model.name if meta.model.name != "timm" else f"timm {meta.model.backbone}"]
    if meta.epoch is not None:
        facts.append(f"epoch {meta.epoch}")
    val = meta.val_acc if meta.val_acc is not None else meta.metrics.get("val_accuracy")
    if val is not None:
        facts.append(f"val acc {val:.1%}")
    test = meta.metrics.get("test_accuracy")
    if test is None:  # a run folder (or an export inside one): the test accuracy its training measured at the end
        try:
            results = read_results(path.parent)
            test = (results.test or {}).get("accuracy") if results is not None else None
        except (DamagedResults, AttributeError):
            test = None
    if isinstance(test, (int, float)):
        facts.append(f"test acc {test:.1%}")
    if path.suffix == ".onnx":
        facts.append("ONNX Runtime")
    shipped = shipped_model()
    is_shipped = shipped is not None and path.with_suffix(shipped.suffix).resolve() == shipped.resolve()
    return f"fervit: model {'the shipped model ' if is_shipped else ''}{path} ({', '.join(facts)})"


def default_model() -> Path:
    """The shipped model if there is one, else the newest run under ./runs, else a one-line error."""
    path = shipped_model() or newest_run()
    if path is None:
        raise FervitError(f"no model to use: pass --model RUN_DIR_OR_CHECKPOINT, or train one with `fervit train` "
                          f"(looked for a shipped model and for runs under ./{RUNS_DIR})")
    return path


def check_meta(meta: ModelFile, source: Path) -> list[str]:
    """The class names of a fervit model description; a one-line error if it cannot take 48x48 gray faces."""
    classes, size, channels, num_classes = meta.classes, meta.input.size, meta.input.channels, meta.model.num_classes
    if (size, channels) != (IMG_SIZE, 1):
        raise FervitError(f"'{source}' expects {size}x{size} images with {channels} channel(s); fervit's face "
                          f"crops are {IMG_SIZE}x{IMG_SIZE} grayscale")
    if len(classes) != num_classes:
        raise FervitError(f"'{source}' names {len(classes)} classes but its model has {num_classes} outputs")
    return classes


def load_classifier(model: str | os.PathLike | None = None, backend: str = "auto", device: str = "cpu",
                    runs_dir: str | os.PathLike = RUNS_DIR):
    """(classifier, meta, source path) for a run folder, .safetensors or .onnx file, or `last` (see
    `resolve_model`; default: `default_model()`).

    backend "auto" follows the file: .onnx -> ONNX Runtime, the shipped model -> its ONNX export on a CPU when
    ONNX Runtime is installed (the two give the same probabilities within 1e-4), else PyTorch; "onnx" with a
    run folder or checkpoint uses the .onnx written beside it by `fervit export`.
    """
    if backend not in ("auto", "torch", "onnx"):
        raise FervitError(f"unknown backend '{backend}'; choose auto, torch or onnx")
    path = resolve_model(model, runs_dir)
    model = model if model and str(model) != LAST else None  # how the error below names it
    is_onnx = path.suffix == ".onnx"
    onnx_export = shipped_onnx(path) if backend == "auto" and not is_onnx and str(device) == "cpu" else None
    if onnx_export is not None:
        path, is_onnx = onnx_export, True
    if is_onnx and backend == "torch":
        raise FervitError(f"'{path}' is an ONNX file; use --backend onnx, or give the run folder for PyTorch")
    if backend == "onnx" and not is_onnx:
        path = find_checkpoint(path).with_suffix(".onnx")
        if not path.is_file():
            raise FervitError(f"no ONNX export at '{path}'; run `fervit export {model or path.parent}` first")
        is_onnx = True
    if is_onnx:
        from fervit.inference.onnx_runtime import load_onnx

        classifier, meta = load_onnx(path)
    else:
        from fervit.inference.torch_classifier import load_torch

        classifier, meta = load_torch(path, device)
        path = find_checkpoint(path)
    check_meta(meta, path)
    return classifier, meta, path


class Predictor:
    """A loaded model plus a face detector: photos in, `ImageResult`s out.

    Every face of a batch of images goes through the model in one forward pass. Not thread-safe
    (the detector is not): a server serialises calls.
    """

    def __init__(self, classifier, meta: ModelFile, source: Path | None = None, margin: float = MARGIN,
                 max_pixels: int = MAX_PIXELS, detector: FaceDetector | None = None, tta: str = "none"):
        self.classifier, self.meta, self.source = classifier, meta, source
        self.classes = list(meta.classes)
        self.crop_size = meta.model.crop_size
        try:
            self.tta = tta_mode(tta)
            tta_views(np.zeros((1, 1, IMG_SIZE, IMG_SIZE), np.float32), self.tta, self.crop_size)  # ten-crop: a crop model
        except ValueError as e:
            raise FervitError(f"{source or 'this model'}: {e}") from None
        self.margin, self.max_pixels = margin, max_pixels
        self._detector = detector

    @property
    def temperature(self) -> float:
        """The model file's calibration temperature (1: uncalibrated), read from the description each call."""
        return self.meta.temperature

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, backend: str = "auto", device: str = "cpu",
             runs_dir: str | os.PathLike = RUNS_DIR, **kwargs) -> Predictor:
        """Load a model (see `load_classifier`) and wrap it."""
        classifier, meta, source = load_classifier(model, backend, device, runs_dir)
        return cls(classifier, meta, source, **kwargs)

    @property
    def backend(self) -> str:
        return self.classifier.backend

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:  # built on first use so face crops alone never need OpenCV
            self._detector = FaceDetector()
        return self._detector

    def classify(self, faces: np.ndarray) -> np.ndarray:
        """(N, 48, 48) uint8 faces -> (N, C) calibrated probabilities, in one forward pass."""
        if len(faces) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        x = normalize(np.ascontiguousarray(faces), self.meta.input.mean, self.meta.input.std)
        logits = self.classifier(tta_views(x, self.tta, self.crop_size))
        logp = mean_log_probs(np.asarray(logits, dtype=np.float64), len(faces))
        # calibrated: softmax(logits / T) (log-probabilities differ from the logits by a per-face constant, so
        # this is the same thing); T > 0 never changes which class wins
        return np.exp(log_softmax(logp / self.temperature)).astype(np.float32)

    def find_faces(self, im: Image.Image, detect: str = "auto") -> tuple[list[Box], list[np.ndarray], bool]:
        """(boxes, 48x48 crops, whole) for one image; `whole` means it was taken as a face crop."""
        if detect not in DETECT_MODES:
            raise FervitError(f"detect must be one of {', '.join(DETECT_MODES)}, got '{detect}'")
        gray = to_gray(im)
        if detect == "never" or (detect == "auto" and is_face_crop(im)):
            return [Box(0, 0, im.width, im.height)], [to_face(gray)], True
        boxes = self.detector(gray)
        return boxes, [face_crop(gray, b, self.margin) for b in boxes], False

    def predict_images(self, images: Sequence[tuple[str, Image.Image | ImageError]], detect: str = "auto",
                       keep_images: bool = False) -> list[ImageResult]:
        """Results for already-decoded images (an `ImageError` in place of an image is reported as such)."""
        results, crops, owners = [], [], []
        for name, im in images:
            if isinstance(im, ImageError):
                results.append(ImageResult(name, error=str(im)))
                continue
            boxes, faces, whole = self.find_faces(im, detect)
            res = ImageResult(name, whole=whole, image=im if keep_images else None)
            res.faces = [Face(b, {}) for b in boxes]
            results.append(res)
            crops += faces
            owners += [res] * len(faces)
        probs = self.classify(np.stack(crops) if crops else np.zeros((0, IMG_SIZE, IMG_SIZE), np.uint8))
        counters: dict[int, int] = {}
        for res, p in zip(owners, probs):
            i = counters.get(id(res), 0)
            counters[id(res)] = i + 1
            res.faces[i].probabilities = {c: float(v) for c, v in zip(self.classes, p)}
        return results

    def predict_sources(self, sources: Iterable[tuple[str, object]], detect: str = "auto", batch_size: int = 16,
                        progress: bool = False, total: int | None = None,
                        keep_images: bool = False) -> Iterator[ImageResult]:
        """Decode and classify (name, path/bytes/file) pairs `batch_size` images at a time, in order."""
        bar = progress_bar(total=total, desc="predicting", quiet=not progress)
        batch: list[tuple[str, Image.Image | ImageError]] = []
        for name, src in sources:
            try:
                batch.append((name, open_image(src, self.max_pixels)))
            except ImageError as e:
                batch.append((name, e))
            if len(batch) == batch_size:
                yield from self.predict_images(batch, detect, keep_images)
                bar.update(len(batch))
                batch = []
        if batch:
            yield from self.predict_images(batch, detect, keep_images)
            bar.update(len(batch))
        bar.close()


def expand_inputs(inputs: Sequence[str], stdin=None) -> list[tuple[str, object]]:
    """(name, source) for every file named, every file under a named folder (recursively), and `-` for stdin."""
    out: list[tuple[str, object]] = []
    for item in inputs:
        if item == "-":
            out.append(("-", (stdin or sys.stdin.buffer).read()))
            continue
        path = Path(item)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path).parts
                if any(part.startswith(".") for part in rel) or p.is_dir():  # skip .DS_Store, .git/...
                    continue
                out.append((str(p), p))  # FIFOs and broken links too: open_image reports them as skipped
        else:
            out.append((item, path))
    return out
