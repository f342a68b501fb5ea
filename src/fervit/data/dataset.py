"""Read FER-2013 once into a uint8 tensor cache.

Accepted inputs:
- a folder `ROOT/{train,test}/<class>/*.{png,jpg,jpeg,bmp}` (Kaggle "emotion-detection-fer" and
  "FER-2013" spellings, any case);
- the original `fer2013.csv` (`emotion,pixels,Usage`), given directly or inside ROOT.

Decoded images live in a cache file keyed by the file list, so later runs load in well under a second.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from fervit.errors import FervitError
from fervit.io import atomic_write

CLASSES = ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised")
IMG_SIZE = 48
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}
ALIASES = {"disgust": "disgusted", "fear": "fearful", "surprise": "surprised"}
# fer2013.csv label order: 0=angry 1=disgust 2=fear 3=happy 4=sad 5=surprise 6=neutral
CSV_LABELS = (0, 1, 2, 3, 5, 6, 4)
USAGES = ("", "Training", "PublicTest", "PrivateTest")  # index 0: unknown
FOLDERS = ("train", "test")
CACHE_VERSION = "1"
LAYOUT_HINT = (
    "expected ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg (classes: "
    + ", ".join(CLASSES)
    + ") or a fer2013.csv; get FER-2013 with `fervit data fetch` or from "
    "https://www.kaggle.com/datasets/ananthu017/emotion-detection-fer"
)


@dataclass
class FerData:
    """Every image of a dataset root, decoded: the single source the splits index into."""

    images: torch.Tensor  # (N, 48, 48) uint8
    labels: torch.Tensor  # (N,) int64, index into CLASSES
    folder: torch.Tensor  # (N,) uint8, index into FOLDERS
    usage: torch.Tensor  # (N,) uint8, index into USAGES (0 when the name does not say)
    paths: list[str]  # relative to the root, or "fer2013.csv:<row>"
    skipped: int = 0  # files that could not be read

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> FerData:
        """A FerData holding only `indices` (e.g. a small slice for a quick run)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return FerData(self.images[idx], self.labels[idx], self.folder[idx], self.usage[idx],
                       [self.paths[i] for i in idx.tolist()], 0)


def class_index(name: str) -> int | None:
    """The class index of a folder name, accepting the known spellings in any case."""
    low = name.lower()
    low = ALIASES.get(low, low)
    return CLASSES.index(low) if low in CLASSES else None


def default_cache_dir() -> Path:
    """$FERVIT_CACHE, else the platform's user cache folder (never the data folder, which may be read-only)."""
    if os.environ.get("FERVIT_CACHE"):
        return Path(os.environ["FERVIT_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("fervit"))


def load_fer(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None, strict: bool = False,
             progress: bool = True) -> FerData:
    """Load a dataset root (folder layout or fer2013.csv), decoding at most once per file list."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FervitError(f"data root '{root}' does not exist; {LAYOUT_HINT}")
    csv_path = root if root.is_file() else root / "fer2013.csv"
    if root.is_file() and root.suffix.lower() != ".csv":
        raise FervitError(f"data root '{root}' is a file but not a .csv; {LAYOUT_HINT}")
    if csv_path.is_file():
        entries, key_src = None, f"csv:{csv_path.resolve()}:{csv_path.stat().st_size}:{csv_path.stat().st_mtime_ns}"
    else:
        entries, nonimages = _scan_folders(root)
        key_src = "\n".join(f"{rel}:{size}:{mtime}" for rel, _, _, size, mtime in entries)
        key_src += f"\nnonimages:{nonimages}"
    key = hashlib.sha256(f"v{CACHE_VERSION}\n{root.resolve()}\n{key_src}".encode()).hexdigest()[:20]
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    tensors_path, meta_path = cache / f"fer-{key}.safetensors", cache / f"fer-{key}.json"
    if tensors_path.is_file() and meta_path.is_file():
        try:
            t = load_file(tensors_path)
            meta = json.loads(meta_path.read_text())
            data = FerData(t["images"], t["labels"], t["folder"], t["usage"], meta["paths"], meta["skipped"])
            _warn_skipped(data.skipped, meta.get("skip_examples", []), strict)
            return data
        except Exception:  # a damaged cache is rebuilt, never fatal
            pass
    if entries is None:
        data, examples = _read_csv(csv_path, strict, progress)
    else:
        data, examples = _decode_folders(root, entries, strict, progress)
        data.skipped += nonimages
    _warn_skipped(data.skipped, examples, strict)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_write(tensors_path, "wb") as f:
            f.write(_safetensors_bytes(data))
        with atomic_write(meta_path, "w") as f:
            json.dump({"paths": data.paths, "skipped": data.skipped, "skip_examples": examples}, f)
    except OSError as e:
        warnings.warn(f"could not write the data cache in {cache} ({e}); set data.cache_dir to a writable folder",
                      stacklevel=2)
    return data


def _safetensors_bytes(data: FerData) -> bytes:
    from safetensors.torch import save

    return save({"images": data.images.contiguous(), "labels": data.labels, "folder": data.folder,
                 "usage": data.usage})


def _warn_skipped(skipped: int, examples: list[str], strict: bool) -> None:
    if not skipped:
        return
    msg = f"skipped {skipped} unreadable or non-image file(s), e.g. {', '.join(examples[:3])}"
    if strict:
        raise FervitError(msg + " (data.strict is on; remove them or turn strict off)")
    warnings.warn(msg, stacklevel=3)


def _scan_folders(root: Path):
    """List (relpath, label, folder, size, mtime) for every image, sorted; count non-image files."""
    if not root.is_dir():
        raise FervitError(f"data root '{root}' is not a folder; {LAYOUT_HINT}")
    entries, nonimages = [], 0
    found_split = False
    for fi, split in enumerate(FOLDERS):
        split_dir = next((p for p in root.iterdir() if p.is_dir() and p.name.lower() == split), None)
        if split_dir is None:
            continue
        found_split = True
        for class_dir in sorted(split_dir.iterdir()):
            if class_dir.name.startswith("."):
                continue
            if not class_dir.is_dir():
                nonimages += 1
                continue
            label = class_index(class_dir.name)
            if label is None:
                raise FervitError(
                    f"unknown class folder '{class_dir.relative_to(root)}'; known class names: "
                    f"{', '.join(CLASSES)} (also disgust, fear, surprise)")
            for dirpath, _, files in os.walk(class_dir):
                for fname in files:
                    if fname.startswith("."):
                        continue
                    path = Path(dirpath) / fname
                    if path.suffix.lower() not in IMAGE_EXTENSIONS:
                        nonimages += 1
                        continue
                    st = path.stat()
                    entries.append((path.relative_to(root).as_posix(), label, fi, st.st_size, st.st_mtime_ns))
    if not found_split:
        raise FervitError(f"no train/ or test/ folder in '{root}'; {LAYOUT_HINT}")
    if not entries:
        raise FervitError(f"no images found under '{root}'; {LAYOUT_HINT}")
    entries.sort()
    return entries, nonimages


def _usage_of(name: str) -> int:
    for i, usage in enumerate(USAGES[1:], start=1):
        if name.startswith(usage + "_"):
            return i
    return 0


def decode_image(source) -> np.ndarray:
    """Any PIL-readable image (path or file object) as a (48, 48) uint8 grayscale array."""
    with Image.open(source) as im:
        im.load()
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGBA").convert("RGB") if "A" in im.mode or im.mode == "P" else im.convert("RGB")
        im = im.convert("L")
        if im.size != (IMG_SIZE, IMG_SIZE):
            im = im.resize((IMG_SIZE, IMG_SIZE), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _decode_one(path: Path):
    try:
        return decode_image(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _decode_folders(root: Path, entries, strict: bool, progress: bool):
    n = len(entries)
    images = np.zeros((n, IMG_SIZE, IMG_SIZE), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(_decode_one, (root / e[0] for e in entries), chunksize=64)
        for i, arr in enumerate(tqdm(results, total=n, desc=f"decoding {root.name}", unit="img",
                                     disable=not progress, leave=False)):
            if arr is not None:
                images[i], ok[i] = arr, True
    examples = [entries[i][0] for i in np.flatnonzero(~ok)[:5]]
    keep = np.flatnonzero(ok)
    if len(keep) == 0:
        raise FervitError(f"none of the {n} image files under '{root}' could be read; {LAYOUT_HINT}")
    data = FerData(
        images=torch.from_numpy(images[keep]),
        labels=torch.tensor([entries[i][1] for i in keep], dtype=torch.int64),
        folder=torch.tensor([entries[i][2] for i in keep], dtype=torch.uint8),
        usage=torch.tensor([_usage_of(Path(entries[i][0]).name) for i in keep], dtype=torch.uint8),
        paths=[entries[i][0] for i in keep],
        skipped=int(n - len(keep)),
    )
    return data, examples


def _read_csv(path: Path, strict: bool, progress: bool):
    images, labels, usages, paths, examples = [], [], [], [], []
    skipped = 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"emotion", "pixels"} <= set(reader.fieldnames):
            raise FervitError(f"'{path}' has columns {reader.fieldnames}; a fer2013.csv needs emotion,pixels[,Usage]")
        for row_no, row in enumerate(tqdm(reader, desc=f"reading {path.name}", unit="row", disable=not progress,
                                          leave=False), start=2):
            try:
                label = CSV_LABELS[int(row["emotion"])]
                pixels = np.array(row["pixels"].split(), dtype=np.uint8)
                if pixels.size != IMG_SIZE * IMG_SIZE:
                    raise ValueError
            except (ValueError, IndexError, TypeError, AttributeError, OverflowError):
                skipped += 1
                if len(examples) < 5:
                    examples.append(f"{path.name}:{row_no}")
                continue
            images.append(pixels.reshape(IMG_SIZE, IMG_SIZE))
            labels.append(label)
            usage = (row.get("Usage") or "").strip()
            usages.append(USAGES.index(usage) if usage in USAGES else 0)
            paths.append(f"{path.name}:{row_no}")
    if not images:
        raise FervitError(f"'{path}' holds no readable rows; {LAYOUT_HINT}")
    usage_t = torch.tensor(usages, dtype=torch.uint8)
    data = FerData(
        images=torch.from_numpy(np.stack(images)),
        labels=torch.tensor(labels, dtype=torch.int64),
        folder=(usage_t >= 2).to(torch.uint8),  # PublicTest/PrivateTest rows play the test/ folder
        usage=usage_t,
        paths=paths,
        skipped=skipped,
    )
    return data, examples
