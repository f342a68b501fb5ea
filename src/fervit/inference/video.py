"""Video files and the webcam: the faces of every Nth frame, classified by a `Predictor` and followed from
frame to frame with a face track id.

Each frame goes through the photo path unchanged (`Predictor.predict_images`: the same detector, crop and
calibrated probabilities, `batch_size` frames per forward pass), so a frame and the same picture saved as a
photo give the same answer. The frames come from `frames.py`; `video_outputs.py` writes what they gave.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fervit.inference.faces import Box
from fervit.inference.frames import Frame, FrameReader
from fervit.inference.predictor import Face, Predictor

TRACK_IOU = 0.3  # a face continues a track when its box overlaps the track's last box this much ...
TRACK_MAX_GAP = 10  # ... and the track was seen in one of the last 10 classified frames


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
