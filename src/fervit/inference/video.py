"""Video files and the webcam: the faces of every Nth frame, classified by a `Predictor` and followed from
frame to frame with a face track id; written as JSON, CSV, an annotated video and a timeline plot.

Frames are decoded with OpenCV (the `detect` extra, which face detection needs anyway). Each frame goes
through the photo path unchanged (`Predictor.predict_images`: the same detector, crop and calibrated
probabilities, `batch_size` frames per forward pass), so a frame and the same picture saved as a photo
give the same answer.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fervit.errors import FervitError
from fervit.inference.annotate import COLOURS, draw_faces
from fervit.inference.faces import Box, ImageError, _check_regular_file
from fervit.inference.predictor import Face, Predictor
from fervit.io import atomic_write

# FFmpeg inside OpenCV prints its own complaints ("moov atom not found") straight to stderr; fervit reports a
# bad video in one line of its own instead. Read when a capture opens, so setting it here is in time.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}
# a run of this many unreadable frames means the rest of the file is missing (truncated): stop instead of
# trying every frame its header still declares
MAX_BAD_RUN = 50
TRACK_IOU = 0.3  # a face continues a track when its box overlaps the track's last box this much ...
TRACK_MAX_GAP = 10  # ... and the track was seen in one of the last 10 classified frames
TIMELINE_TRACKS = 6  # the timeline plots the longest tracks, one panel each


def is_video(name: str | os.PathLike) -> bool:
    """Told by the file name: an image is told by its content, but a video container has no single signature."""
    return Path(name).suffix.lower() in VIDEO_SUFFIXES


def _cv2():
    try:
        import cv2
    except ImportError:
        raise FervitError("videos and the webcam need OpenCV: pip install 'fervit[detect]'") from None
    return cv2


class _SilentOpenCV:
    """OpenCV's own log lines (e.g. "[ WARN:0] can't open camera by index") off while a capture opens."""

    def __enter__(self):
        logging = _cv2().utils.logging
        self._previous = logging.getLogLevel()
        logging.setLogLevel(logging.LOG_LEVEL_SILENT)

    def __exit__(self, *exc):
        _cv2().utils.logging.setLogLevel(self._previous)


def open_video(path: str | os.PathLike):
    """An opened cv2.VideoCapture for a video file; `ImageError` (the per-input report) when it is unusable."""
    cv2 = _cv2()
    _check_regular_file(Path(path))  # FIFOs, folders and missing files get the photo path's words
    with _SilentOpenCV():
        capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ImageError("not a readable video (damaged, cut short, or a format OpenCV's FFmpeg cannot decode)",
                         "not_image")
    return capture


def open_camera(index: int = 0):
    """An opened cv2.VideoCapture for camera `index`, or a one-line FervitError saying there is none."""
    cv2 = _cv2()
    with _SilentOpenCV():
        capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        raise FervitError(f"no camera at --webcam {index}: OpenCV could not open one (none is connected, it is "
                          "in use by another program, or this user may not access it); predict a video file instead")
    return capture


@dataclass
class Frame:
    index: int  # in the source, counting unreadable frames too
    time_s: float
    image: Image.Image  # RGB


class FrameReader:
    """Every `every`th frame of a capture as a `Frame`, counting the frames that cannot be decoded.

    A frame that fails to decode where the header says there are more is skipped and counted; the
    failures after the last good frame are a truncated file, reported as where the video ends."""

    def __init__(self, capture, every: int = 1, live: bool = False, max_frames: int | None = None):
        cv2 = _cv2()
        self.capture, self.every, self.live, self.max_frames = capture, every, live, max_frames
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and math.isfinite(fps) and 0 < fps < 1000 else 0.0
        declared = 0 if live else capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.declared = int(declared) if declared and math.isfinite(declared) and declared > 0 else 0
        self.decoded = 0  # frames decoded (classified or skipped by --every)
        self.failures = 0  # frames that could not be decoded, in all
        self.trailing = 0  # ... of which after the last good one
        self.last_good = -1
        self.width = self.height = 0

    def __iter__(self) -> Iterator[Frame]:
        cv2 = _cv2()
        index, yielded, start = 0, 0, time.monotonic()
        while self.max_frames is None or yielded < self.max_frames:
            wanted = index % self.every == 0
            ok = self.capture.grab()
            image = None
            if ok and wanted:
                ok, image = self.capture.retrieve()
                ok = ok and image is not None and image.size > 0
            if not ok:
                if self.live or not self.declared or index >= self.declared:
                    break  # the end of the stream (a camera that stops giving frames ends the session)
                self.failures += 1  # the header says there is more: skip this frame, count it
                self.trailing += 1
                index += 1
                if self.trailing >= MAX_BAD_RUN:
                    break
                continue
            self.decoded += 1
            self.trailing, self.last_good = 0, index
            if wanted:
                t = time.monotonic() - start if self.live else self._time(index)
                frame = Frame(index, t, Image.fromarray(_to_rgb(cv2, image)))
                self.width, self.height = frame.image.size
                yielded += 1
                yield frame
            index += 1

    def _time(self, index: int) -> float:
        """The frame's time stamp from the container; from its index and the frame rate where none is given."""
        ms = self.capture.get(_cv2().CAP_PROP_POS_MSEC)
        if ms and math.isfinite(ms) and (ms > 0 or index == 0):
            return ms / 1000
        return index / self.fps if self.fps else 0.0

    @property
    def unreadable(self) -> int:
        """Frames skipped because they could not be decoded, with good frames after them."""
        return self.failures - self.trailing

    def problem(self) -> str | None:
        """One line on what could not be read, or None when every frame was."""
        parts = []
        if self.unreadable:
            parts.append(f"{self.unreadable} unreadable frame{'s' if self.unreadable != 1 else ''} skipped")
        if self.trailing:
            parts.append(f"the video ends after frame {self.last_good + 1} of the {self.declared} its header "
                         "declares (cut short or damaged)")
        return "; ".join(parts) or None


def _to_rgb(cv2, image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:  # 16-bit sources: keep the top 8 bits, as photos are scaled
        image = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image.astype(np.uint8)
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[..., None], 3, axis=2))
    code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    return inter / max(a.w * a.h + b.w * b.h - inter, 1)


class Tracker:
    """Face track ids across classified frames: greedy matching on box overlap (IoU), falling back to
    centre distance for a face that moved more than its overlap shows (sparse frames with --every).
    A track unseen for more than `max_gap` classified frames ends; a face that comes back gets a new id."""

    def __init__(self, min_iou: float = TRACK_IOU, max_gap: int = TRACK_MAX_GAP):
        self.min_iou, self.max_gap = min_iou, max_gap
        self.tracks: dict[int, tuple[Box, int]] = {}  # id -> (last box, step last seen)
        self.step, self.next_id = 0, 1

    def assign(self, boxes: list[Box]) -> list[int]:
        self.step += 1
        live = {t: box for t, (box, seen) in self.tracks.items() if self.step - seen <= self.max_gap}
        candidates = []
        for i, b in enumerate(boxes):
            for t, tb in live.items():
                overlap = iou(b, tb)
                dist = math.hypot(b.x + b.w / 2 - tb.x - tb.w / 2, b.y + b.h / 2 - tb.y - tb.h / 2)
                if overlap >= self.min_iou or dist < 0.5 * max(tb.w, tb.h):
                    candidates.append((overlap, -dist, i, t))
        ids: list[int | None] = [None] * len(boxes)
        taken = set()
        for _, _, i, t in sorted(candidates, reverse=True):  # best overlap first, then nearest
            if ids[i] is None and t not in taken:
                ids[i] = t
                taken.add(t)
        for i, b in enumerate(boxes):
            if ids[i] is None:
                ids[i], self.next_id = self.next_id, self.next_id + 1
            self.tracks[ids[i]] = (b, self.step)
        return ids


@dataclass
class FrameResult:
    """One classified frame: its faces, each with a track id."""

    index: int
    time_s: float
    faces: list[Face] = field(default_factory=list)
    tracks: list[int] = field(default_factory=list)
    whole: bool = False  # the whole frame taken as a face crop

    def to_dict(self) -> dict:
        return {"frame": self.index, "time_s": round(self.time_s, 4),
                "faces": [{"track": t, **f.to_dict()} for t, f in zip(self.tracks, self.faces)]}


@dataclass
class VideoResult:
    """What one video (or a webcam session) gave: its classified frames and what could not be read."""

    file: str
    fps: float = 0.0
    width: int = 0
    height: int = 0
    every: int = 1
    declared_frames: int = 0  # 0: unknown (a camera, or a container that does not say)
    decoded_frames: int = 0
    unreadable_frames: int = 0
    frames: list[FrameResult] = field(default_factory=list)
    problem: str | None = None  # unreadable frames or a truncated file, in one line
    error: str | None = None  # the video could not be used at all
    interrupted: bool = False

    def track_summary(self, classes: list[str]) -> list[dict]:
        """Per track: frames it is in, first and last time, mean probabilities and the emotion they favour."""
        by: dict[int, list[tuple[float, Face]]] = {}
        for fr in self.frames:
            for t, f in zip(fr.tracks, fr.faces):
                by.setdefault(t, []).append((fr.time_s, f))
        out = []
        for t, seen in sorted(by.items()):
            mean = {c: float(np.mean([f.probabilities[c] for _, f in seen])) for c in classes}
            out.append({"track": t, "frames": len(seen), "first_s": round(seen[0][0], 4),
                        "last_s": round(seen[-1][0], 4), "emotion": max(mean, key=mean.get),
                        "mean_probabilities": {c: round(v, 6) for c, v in mean.items()}})
        return out

    def to_dict(self, classes: list[str]) -> dict:
        d = {"file": self.file, "fps": round(self.fps, 3), "width": self.width, "height": self.height,
             "every": self.every, "declared_frames": self.declared_frames, "decoded_frames": self.decoded_frames,
             "classified_frames": len(self.frames), "unreadable_frames": self.unreadable_frames}
        for key in ("problem", "error"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.interrupted:
            d["interrupted"] = True
        d["tracks"] = self.track_summary(classes)
        d["frames"] = [fr.to_dict() for fr in self.frames]
        return d


def predict_frames(predictor: Predictor, name: str, reader: FrameReader, detect: str = "auto",
                   batch_size: int = 16, on_frame: Callable[[Frame, FrameResult], None] | None = None,
                   progress=None) -> VideoResult:
    """Classify the frames `reader` gives, `batch_size` frames per forward pass, and track their faces.

    `on_frame(frame, result)` runs for each frame in order (the annotated video, live output). Ctrl-C stops
    the reading and returns what was classified so far, marked `interrupted`."""
    result = VideoResult(name, every=reader.every)
    tracker = Tracker()
    batch: list[Frame] = []

    def flush():
        for frame, res in zip(batch, predictor.predict_images([(f"{name}@{f.index}", f.image) for f in batch],
                                                             detect)):
            out = FrameResult(frame.index, frame.time_s, res.faces, tracker.assign([f.box for f in res.faces]),
                              res.whole)
            result.frames.append(out)
            if on_frame is not None:
                on_frame(frame, out)
        if progress is not None:
            progress.update(len(batch))
        batch.clear()

    try:
        for frame in reader:
            batch.append(frame)
            if len(batch) >= batch_size:
                flush()
        flush()
    except KeyboardInterrupt:
        result.interrupted = True
        batch.clear()  # a half-read batch is dropped: its frames were never classified
    result.fps, result.width, result.height = reader.fps, reader.width, reader.height
    result.declared_frames, result.decoded_frames = reader.declared, reader.decoded
    result.unreadable_frames = reader.failures
    result.problem = reader.problem()
    if reader.decoded == 0 and not result.interrupted:
        result.error = "no frame of it could be decoded"
    return result


class AnnotatedVideo:
    """The classified frames with boxes, "#track emotion p%" labels, written as an MP4 (mp4v) as they come.

    Opened at the first frame (its size is not known before); a frame rate of the source's divided by
    --every keeps the copy as long as the original."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps if fps > 0 else 25.0
        self.writer = None
        self.failed = False

    def write(self, frame: Frame, result: FrameResult) -> None:
        if self.failed:
            return
        cv2 = _cv2()
        image = draw_faces(frame.image, result.faces, [f"#{t}" for t in result.tracks])
        if self.writer is None:
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, image.size)
            if not self.writer.isOpened():
                self.failed = True
                return
        self.writer.write(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))

    def close(self) -> Path | None:
        if self.writer is not None:
            self.writer.release()
        return self.path if self.writer is not None and not self.failed else None


def output_dir(base: str | os.PathLike, name: str) -> Path:
    """A new folder BASE/<name's stem>_emotions for one video's outputs: an existing one (or any file of that
    name) is never reused; _2, _3, ... follow. Made here, so two runs at once cannot pick the same one."""
    stem = Path(name).stem or "video"
    base = Path(base)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FervitError(f"cannot make the output folder '{base}' ({e.strerror or e})") from None
    for n in range(1, 10_000):
        candidate = base / (f"{stem}_emotions" if n == 1 else f"{stem}_emotions_{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise FervitError(f"cannot make the output folder '{candidate}' ({e.strerror or e})") from None
    raise FervitError(f"'{base}' already holds 9999 {stem}_emotions folders; give another --out")


CSV_HEAD = ["file", "frame", "time_s", "track", "x", "y", "w", "h", "emotion"]


def write_csv(results: list[VideoResult], classes: list[str], out) -> None:
    """One row per face per classified frame; a frame without faces gets one row saying so."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_HEAD, *classes, "note"])
    for r in results:
        for fr in r.frames:
            where = [r.file, fr.index, f"{fr.time_s:.4f}"]
            if not fr.faces:
                writer.writerow([*where, "", "", "", "", "", "", *[""] * len(classes), "no face found"])
            for t, f in zip(fr.tracks, fr.faces):
                writer.writerow([*where, t, *f.box.as_list(), f.emotion,
                                 *(f"{f.probabilities[c]:.6f}" for c in classes), ""])


def timeline_png(result: VideoResult, classes: list[str], path: Path) -> Path:
    """Each class's probability over time, one panel per face track (the longest `TIMELINE_TRACKS`)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = sorted(result.track_summary(classes), key=lambda t: -t["frames"])[:TIMELINE_TRACKS]
    tracks.sort(key=lambda t: t["track"])
    fig, axes = plt.subplots(max(len(tracks), 1), 1, figsize=(9, 2.4 * max(len(tracks), 1) + 0.6), squeeze=False,
                             sharex=True)
    for ax, summary in zip(axes[:, 0], tracks):
        t = summary["track"]
        points = [(fr.time_s, f) for fr in result.frames for tr, f in zip(fr.tracks, fr.faces) if tr == t]
        times = [p[0] for p in points]
        for c in classes:
            ax.plot(times, [f.probabilities[c] for _, f in points], color=COLOURS.get(c), label=c,
                    marker="." if len(points) < 60 else None, linewidth=1.4)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
        ax.set_title(f"face #{t}: {summary['frames']} frames, mostly {summary['emotion']}", fontsize=10)
        ax.grid(alpha=0.3)
    if not tracks:
        axes[0, 0].text(0.5, 0.5, "no face found in any classified frame", ha="center", va="center")
        axes[0, 0].set_yticks([])
    else:
        # above the first panel, where it hides no line
        axes[0, 0].legend(loc="lower center", bbox_to_anchor=(0.5, 1.12), fontsize=8, ncol=len(classes), frameon=False)
    axes[-1, 0].set_xlabel("time (s)")
    more = len(result.track_summary(classes)) - len(tracks)
    axes[0, 0].text(0.5, 1.32 if tracks else 1.05, f"{Path(result.file).name}: emotion probabilities"
                    + (f" ({more} shorter tracks not drawn)" if more > 0 else ""), transform=axes[0, 0].transAxes,
                    ha="center", va="bottom", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def write_outputs(result: VideoResult, classes: list[str], folder: Path) -> list[Path]:
    """<stem>.json, <stem>.csv and <stem>_timeline.png into the video's own (new) folder."""
    stem = Path(result.file).stem or "video"
    paths = [folder / f"{stem}.json", folder / f"{stem}.csv", folder / f"{stem}_timeline.png"]
    with atomic_write(paths[0], "w") as f:
        json.dump(result.to_dict(classes), f, indent=1)
    with atomic_write(paths[1], "w") as f:
        write_csv([result], classes, f)
    timeline_png(result, classes, paths[2])
    return paths
