"""What a video gave, written into its own folder: JSON, CSV, an annotated copy and a timeline plot."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from fervit.errors import FervitError
from fervit.inference.annotate import COLOURS, draw_faces
from fervit.inference.frames import Frame, cv2_module
from fervit.inference.video import FrameResult, VideoResult
from fervit.io import atomic_write

TIMELINE_TRACKS = 6  # the timeline plots the longest tracks, one panel each


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
        cv2 = cv2_module()
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
