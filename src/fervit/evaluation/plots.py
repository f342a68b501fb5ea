"""The run folder's figures, rendered headless with matplotlib's Agg backend."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fervit.io import atomic_write  # noqa: E402


def _save(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def curves_png(rows: list[dict], key: str, path: str | os.PathLike, ylabel: str) -> None:
    """Train and validation `key` (loss or acc) per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r[f"train_{key}"] for r in rows], label="train", marker=".")
    ax.plot(epochs, [r[f"val_{key}"] for r in rows], label="validation", marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def confusion_matrix_png(cm, class_names, path: str | os.PathLike, title: str = "") -> None:
    """Row-normalised confusion matrix (each true class sums to 1), labelled with class names."""
    import numpy as np

    cm = np.asarray(cm, dtype=float)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in ticks:
        for j in ticks:
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (row-normalised)")
    _save(fig, path)


def reliability_png(diagrams: dict, temperature: float, path: str | os.PathLike) -> None:
    """One panel per split: each confidence bin's accuracy before and after temperature scaling, against
    the diagonal a calibrated model follows. `diagrams`: split -> (before, after) from `reliability`."""
    fig, axes = plt.subplots(1, len(diagrams), figsize=(5 * len(diagrams), 4.6), squeeze=False)
    for ax, (name, (before, after)) in zip(axes[0], diagrams.items()):
        bins = len(before["count"])
        width = 1.0 / bins
        centres = [(k + 0.5) * width for k in range(bins)]
        for d, label, colour, shift in ((before, "before", "#e6194b", -0.25), (after, f"after (T={temperature:.2f})",
                                                                            "#4363d8", 0.25)):
            # empty bins draw nothing rather than a misleading zero-accuracy bar
            xs = [c + shift * width for c, n in zip(centres, d["count"]) if n]
            ys = [a for a, n in zip(d["accuracy"], d["count"]) if n]
            ax.bar(xs, ys, width=width / 2, color=colour, alpha=0.8, label=f"{label}: ECE {d['ece']:.3f}")
        ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top label)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: {sum(before['count'])} faces, {bins} bins")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
