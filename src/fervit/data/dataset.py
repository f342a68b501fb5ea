"""Read FER-2013 once into a uint8 tensor cache.

Accepted inputs:
- a folder `ROOT/{train,test}/<class>/*.{png,jpg,jpeg,bmp}` (Kaggle "emotion-detection-fer" and
  "FER-2013" spellings, any case);
- the original `fer2013.csv` (`emotion,pixels,Usage`), given directly or inside ROOT.

Decoded images live in a cache file keyed by the file list, so later runs load in well under a second.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fervit.data.images import IMG_SIZE, decode_image
from fervit.errors import FervitError
from fervit.io import atomic_write
from fervit.progress import progress_bar

CLASSES = ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}
ALIASES = {"disgust": "disgusted", "fear": "fearful", "surprise": "surprised"}
# fer2013.csv label order: 0=angry 1=disgust 2=fear 3=happy 4=sad 5=surprise 6=neutral
CSV_LABELS = (0, 1, 2, 3, 5, 6, 4)
USAGES = ("", "Training", "PublicTest", "PrivateTest")  # index 0: unknown
USAGE_SPELLINGS = {u.lower(): i for i, u in enumerate(USAGES) if u}  # "Private Test", "privatetest" -> PrivateTest
FOLDERS = ("train", "test")
CACHE_VERSION = "2"
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
        what = "is a broken or looping symbolic link" if root.is_symlink() else "does not exist"
        raise FervitError(f"data root '{root}' {what}; {LAYOUT_HINT}")
    csv_path = root if root.is_file() else root / "fer2013.csv"
    if root.is_file() and root.suffix.lower() != ".csv":
        raise FervitError(f"data root '{root}' is a file but not a .csv; {LAYOUT_HINT}")
    if csv_path.is_file():
        entries, key_src = None, f"csv:{csv_path.resolve()}:{csv_path.stat().st_size}:{csv_path.stat().st_mtime_ns}"
    else:
        entries, nonimages, scan_examples = _scan_folders(root, strict)
        key_src = "\n".join(f"{rel}:{size}:{mtime}" for rel, _, _, size, mtime in entries)
        key_src += f"\nnonimages:{nonimages}"
    key_digest = hashlib.sha256(f"v{CACHE_VERSION}\n{root.resolve()}\n{key_src}".encode()).hexdigest()
    key = key_digest[:20]
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    tensors_path, meta_path = cache / f"fer-{key}.safetensors", cache / f"fer-{key}.json"
    if tensors_path.is_file() and meta_path.is_file():
        data, meta, problem = _read_cache(tensors_path, meta_path, key_digest)
        if data is not None:
            _warn_skipped(data.skipped, meta.get("skip_examples", []), strict)
            return data
        warnings.warn(f"the data cache {tensors_path.name} in {cache} {problem}; rebuilding it", stacklevel=2)
    if entries is None:
        data, examples = _read_csv(csv_path, strict, progress)
    else:
        data, examples = _decode_folders(root, entries, strict, progress)
        data.skipped += nonimages
        examples = (examples + scan_examples)[:5]
    _warn_skipped(data.skipped, examples, strict)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        blob = _safetensors_bytes(data)
        with atomic_write(tensors_path, "wb") as f:
            f.write(blob)
        listing = {"paths": data.paths, "skipped": data.skipped, "skip_examples": examples}
        with atomic_write(meta_path, "w") as f:
            json.dump({"key": key_digest, "tensors_sha256": hashlib.sha256(blob).hexdigest(),
                       "listing_sha256": _listing_digest(listing), **listing}, f)
    except OSError as e:
        warnings.warn(f"could not write the data cache in {cache} ({e}); set data.cache_dir to a writable folder",
                      stacklevel=2)
    return data


def _read_cache(tensors_path: Path, meta_path: Path, key_digest: str):
    """(data, meta, None) from a cache that belongs to this file list and is intact, else (None, None, why not)."""
    from safetensors.torch import load

    try:
        meta = json.loads(meta_path.read_bytes())
        blob = tensors_path.read_bytes()
    except (OSError, ValueError):
        return None, None, "is unreadable"
    if not isinstance(meta, dict) or meta.get("key") != key_digest:
        return None, None, "was written for another file list"
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        return None, None, "does not match its checksum (damaged)"
    # the file list and skip count are data too: an edited `paths` or `skipped` must not be used as is
    listing = {k: meta.get(k) for k in ("paths", "skipped", "skip_examples")}
    if meta.get("listing_sha256") is None:
        return None, None, "has no checksum of its file list (written by an older fervit)"
    if _listing_digest(listing) != meta["listing_sha256"]:
        return None, None, "does not match its checksum (its file list or skip count was changed)"
    try:
        t = load(blob)
        data = FerData(t["images"], t["labels"], t["folder"], t["usage"], meta["paths"], int(meta["skipped"]))
    except Exception:  # a damaged cache is rebuilt, never fatal
        return None, None, "is damaged"
    if not (len(data.images) == len(data.labels) == len(data.paths)):
        return None, None, "is inconsistent"
    return data, meta, None


def _listing_digest(listing: dict) -> str:
    """The checksum of a cache's JSON part (file list, skip count, examples), over a canonical encoding."""
    return hashlib.sha256(json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _safetensors_bytes(data: FerData) -> bytes:
    from safetensors.torch import save

    return save({"images": data.images.contiguous(), "labels": data.labels, "folder": data.folder,
                 "usage": data.usage})


def _warn_skipped(skipped: int, examples: list[str], strict: bool) -> None:
    if not skipped:
        return
    msg = f"skipped {skipped} unreadable or non-image file(s)"
    if examples:
        msg += f", e.g. {', '.join(examples[:3])}"
    if strict:
        raise FervitError(msg + " (data.strict is on; remove them or turn strict off)")
    warnings.warn(msg, stacklevel=3)


def _scan_folders(root: Path, strict: bool = False):
    """List (relpath, label, folder, size, mtime) for every image, sorted; count (and name a few) skipped files.

    A class folder that cannot be read is named in a warning (an error under `strict`): training without
    one class must never pass unnoticed.
    """
    if not root.is_dir():
        raise FervitError(f"data root '{root}' is not a folder; {LAYOUT_HINT}")
    entries, nonimages, examples, unreadable = [], 0, [], []

    def skip(path: Path, why: str) -> None:
        nonlocal nonimages
        nonimages += 1
        if len(examples) < 5:
            examples.append(f"{path.relative_to(root).as_posix()} ({why})")

    found_split = False
    seen: list[Path] = []  # the class folders so far, of both splits
    for fi, split in enumerate(FOLDERS):
        split_dir = next((p for p in _list_dir(root, root) if p.is_dir() and p.name.lower() == split), None)
        if split_dir is None:
            continue
        found_split = True
        for class_dir in sorted(_list_dir(split_dir, root)):
            if class_dir.name.startswith("."):
                continue
            if not class_dir.is_dir():
                skip(class_dir, "not a class folder")
                continue
            label = class_index(class_dir.name)
            if label is None:
                raise FervitError(
                    f"unknown class folder '{class_dir.relative_to(root)}'; known class names: "
                    f"{', '.join(CLASSES)} (also disgust, fear, surprise)")
            _check_no_overlap(root, split_dir, class_dir, seen)
            seen.append(class_dir)
            for dirpath, _, files in os.walk(class_dir, onerror=lambda e: unreadable.append(e)):
                for fname in sorted(files):
                    if fname.startswith("."):
                        continue
                    path = Path(dirpath) / fname
                    if path.suffix.lower() not in IMAGE_EXTENSIONS:
                        skip(path, "not an image file name")
                        continue
                    try:
                        st = path.stat()
                    except OSError as e:
                        skip(path, "broken symbolic link" if isinstance(e, FileNotFoundError) else
                             "symbolic link loop" if e.errno == errno.ELOOP else e.strerror or str(e))
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        skip(path, "not a regular file")
                        continue
                    entries.append((path.relative_to(root).as_posix(), label, fi, st.st_size, st.st_mtime_ns))
    if unreadable:
        names = ", ".join(f"'{Path(e.filename).relative_to(root)}' ({e.strerror})" for e in unreadable[:3])
        msg = f"cannot read {len(unreadable)} folder(s) under '{root}', so their images are left out: {names}"
        if strict:
            raise FervitError(msg + " (data.strict is on; fix the permissions or turn strict off)")
        warnings.warn(msg + "; fix the permissions", stacklevel=3)
    if not found_split:
        raise FervitError(f"no train/ or test/ folder in '{root}'; {LAYOUT_HINT}")
    if not entries:
        raise FervitError(f"no images found under '{root}'; {LAYOUT_HINT}")
    entries.sort()
    return entries, nonimages, examples


def _check_no_overlap(root: Path, split_dir: Path, class_dir: Path, seen: list[Path]) -> None:
    """A one-line error when a class folder (through a symbolic link) holds the dataset or its split folder, or
    shares images with a class folder seen before: its images would be read twice, under two labels (or a test
    image as a training one). `train/happy -> .` read every training image again as "happy", without a word."""
    real = class_dir.resolve()
    rel = class_dir.relative_to(root).as_posix()
    link = f"is a symbolic link to '{real}', which" if class_dir.is_symlink() else ""
    for holder, what in ((root, "the whole dataset"), (split_dir, f"the {split_dir.name}/ folder")):
        if real == holder.resolve() or real in holder.resolve().parents:
            raise FervitError(f"class folder '{rel}' {link or 'is a folder that'} holds {what}, so every image in "
                              f"it would be read again as '{class_dir.name}'; remove the link")
    for other in seen:
        other_real = other.resolve()
        if real == other_real or real in other_real.parents or other_real in real.parents:
            raise FervitError(f"class folders '{other.relative_to(root).as_posix()}' and '{rel}' share images (one is "
                              "a symbolic link to or into the other), so they would be read under both labels; "
                              "remove the link")


def _list_dir(folder: Path, root: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise FervitError(f"cannot read the folder '{folder}' ({e.strerror or e}); fix its permissions "
                          f"or give another data root") from None


def _usage_of(name: str) -> int:
    for i, usage in enumerate(USAGES[1:], start=1):
        if name.startswith(usage + "_"):
            return i
    return 0


def _decode_one(path: Path):
    try:
        return decode_image(path)
    except Exception:  # Pillow's plugins raise many types on malformed input; each is one skipped file
        return None


def _decode_folders(root: Path, entries, strict: bool, progress: bool):
    n = len(entries)
    images = np.zeros((n, IMG_SIZE, IMG_SIZE), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(_decode_one, (root / e[0] for e in entries), chunksize=64)
        for i, arr in enumerate(progress_bar(results, total=n, desc=f"decoding {root.name}", quiet=not progress)):
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
    try:
        # utf-8-sig: Excel starts the CSVs it saves with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"emotion", "pixels"} <= set(reader.fieldnames):
                raise FervitError(f"'{path}' has columns {reader.fieldnames}; a fer2013.csv needs "
                                  "emotion,pixels[,Usage]")
            for row_no, row in enumerate(progress_bar(reader, desc=f"reading {path.name}", unit="row",
                                                      quiet=not progress), start=2):
                try:
                    emotion = int(row["emotion"])
                    if not 0 <= emotion < len(CSV_LABELS):
                        raise ValueError
                    pixels = np.array(row["pixels"].split(), dtype=np.uint8)
                    if pixels.size != IMG_SIZE * IMG_SIZE:
                        raise ValueError
                except (ValueError, TypeError, AttributeError, OverflowError):
                    skipped += 1
                    if len(examples) < 5:
                        examples.append(f"{path.name}:{row_no}")
                    continue
                images.append(pixels.reshape(IMG_SIZE, IMG_SIZE))
                labels.append(CSV_LABELS[emotion])
                usages.append(_csv_usage(row.get("Usage"), path, row_no))
                paths.append(f"{path.name}:{row_no}")
    except UnicodeDecodeError:
        raise FervitError(f"'{path}' is not UTF-8 text (binary, or another encoding such as Latin-1); "
                          "a fer2013.csv holds emotion,pixels,Usage as plain text") from None
    except csv.Error as e:
        raise FervitError(f"'{path}' is not a readable CSV (line {reader.line_num}: {e}); a fer2013.csv holds "
                          "emotion,pixels,Usage rows") from None
    except OSError as e:
        raise FervitError(f"cannot read '{path}' ({e.strerror or e})") from None
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


def _csv_usage(value: str | None, path: Path, row_no: int) -> int:
    """The USAGES index of a Usage cell; its case and spaces do not matter, any other spelling is an error."""
    key = "".join((value or "").split()).lower()
    if not key:
        return 0
    if key not in USAGE_SPELLINGS:
        raise FervitError(f"'{path}' line {row_no}: unknown Usage '{value}'; expected one of "
                          f"{', '.join(USAGES[1:])} (or an empty cell)")
    return USAGE_SPELLINGS[key]
