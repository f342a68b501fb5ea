"""Frames from a video file or the webcam, decoded with OpenCV (the `detect` extra, which face detection
needs anyway), with a count of the frames that could not be decoded.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fervit.errors import FervitError
from fervit.inference.faces import ImageError, check_regular_file

# FFmpeg inside OpenCV prints its own complaints ("moov atom not found") straight to stderr; fervit reports a
# bad video in one line of its own instead. Read when a capture opens, so setting it here is in time.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}
# a run of this many unreadable frames means the rest of the file is missing (truncated): stop instead of
# trying every frame its header still declares
MAX_BAD_RUN = 50


def is_video(name: str | os.PathLike) -> bool:
    """Told by the file name: an image is told by its content, but a video container has no single signature."""
    return Path(name).suffix.lower() in VIDEO_SUFFIXES


def cv2_module():
    try:
        import cv2
    except ImportError:
        raise FervitError("videos and the webcam need OpenCV: pip install 'fervit[detect]'") from None
    return cv2


class _SilentOpenCV:
    """OpenCV's own log lines (e.g. "[ WARN:0] can't open camera by index") off while a capture opens."""

    def __enter__(self):
        logging = cv2_module().utils.logging
        self._previous = logging.getLogLevel()
        logging.setLogLevel(logging.LOG_LEVEL_SILENT)

    def __exit__(self, *exc):
        cv2_module().utils.logging.setLogLevel(self._previous)


def open_video(path: str | os.PathLike):
    """An opened cv2.VideoCapture for a video file; `ImageError` (the per-input report) when it is unusable."""
    cv2 = cv2_module()
    check_regular_file(Path(path))  # FIFOs, folders and missing files get the photo path's words
    with _SilentOpenCV():
        capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ImageError("not a readable video (damaged, cut short, or a format OpenCV's FFmpeg cannot decode)",
                         "not_image")
    return capture


def open_camera(index: int = 0):
    """An opened cv2.VideoCapture for camera `index`, or a one-line FervitError saying there is none."""
    cv2 = cv2_module()
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
        cv2 = cv2_module()
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
        cv2 = cv2_module()
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
        ms = self.capture.get(cv2_module().CAP_PROP_POS_MSEC)
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
