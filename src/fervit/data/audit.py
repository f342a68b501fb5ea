"""`fervit data audit`: duplicates, label conflicts and blank frames in a FER-2013 copy.

Exact duplicates share every pixel. Near duplicates share a 64-bit difference hash (dHash of a
9x8 downscale): the same face re-encoded, slightly shifted in brightness or re-compressed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from fervit.data.dataset import CLASSES, FOLDERS, FerData
from fervit.data.splits import image_hashes
from fervit.progress import progress_bar

BLANK_STD = 2.0  # a frame whose pixels vary less than this (out of 255) shows no face


def dhash(images: torch.Tensor) -> np.ndarray:
    """(N, 48, 48) uint8 -> (N,) uint64 difference hashes: is each pixel of a 9x8 thumbnail brighter than its right neighbour."""
    small = F.interpolate(images.unsqueeze(1).float(), size=(8, 9), mode="area").squeeze(1)  # (N, 8, 9)
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(images), 64).numpy().astype(np.uint64)
    return (bits << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def _groups(keys) -> list[list[int]]:
    by = defaultdict(list)
    for i, k in enumerate(keys):
        by[k].append(i)
    return [g for g in by.values() if len(g) > 1]


def audit(data: FerData, progress: bool = False) -> dict:
    """Counts (and a few examples) of everything in the data that can bias training or evaluation; `progress`
    shows a bar over its stages (seconds each on the whole dataset)."""
    bar = progress_bar(total=3, desc="auditing", unit="stage", quiet=not progress)
    bar.set_postfix_str("exact duplicates")
    exact = _groups(image_hashes(data.images))
    exact_members = {i for g in exact for i in g}
    bar.update()
    bar.set_postfix_str("near duplicates")
    near = [g for g in _groups(dhash(data.images).tolist()) if not set(g) <= exact_members]
    bar.update()
    bar.set_postfix_str("blank frames")
    folder, labels = data.folder.numpy(), data.labels.numpy()

    def describe(groups):
        cross = [g for g in groups if len({int(folder[i]) for i in g}) > 1]
        conflict = [g for g in groups if len({int(labels[i]) for i in g}) > 1]
        return {
            "groups": len(groups),
            "files": sum(len(g) for g in groups),
            "across_splits": len(cross),
            "conflicting_labels": len(conflict),
            "examples_across_splits": [[data.paths[i] for i in g] for g in cross[:3]],
            "examples_conflicting": [[f"{data.paths[i]} ({CLASSES[labels[i]]})" for i in g] for g in conflict[:3]],
        }

    std = data.images.float().reshape(len(data), -1).std(dim=1).numpy()
    blank = np.flatnonzero(std < BLANK_STD)
    bar.update()
    bar.close()
    return {
        "images": len(data),
        "per_folder": {FOLDERS[f]: int((folder == f).sum()) for f in range(len(FOLDERS))},
        "exact_duplicates": describe(exact),
        "near_duplicates": describe(near),
        "blank_frames": {"count": int(len(blank)), "threshold_std": BLANK_STD,
                         "examples": [data.paths[i] for i in blank[:5]]},
    }


def format_audit(report: dict) -> str:
    lines = [f"{report['images']} images ({', '.join(f'{k}: {v}' for k, v in report['per_folder'].items())})"]
    for key, title in (("exact_duplicates", "exact duplicates (same pixels)"),
                       ("near_duplicates", "near-duplicate candidates (same 64-bit dHash, not pixel-identical)")):
        r = report[key]
        lines.append(f"{title}: {r['groups']} groups, {r['files']} files, {r['across_splits']} groups across "
                     f"train/ and test/, {r['conflicting_labels']} groups with conflicting labels")
        for ex in r["examples_conflicting"][:2]:
            lines.append(f"  conflicting: {', '.join(ex)}")
    b = report["blank_frames"]
    lines.append(f"blank or constant frames (pixel std < {b['threshold_std']:g}): {b['count']}"
                 + (f", e.g. {', '.join(b['examples'][:3])}" if b["examples"] else ""))
    lines.append("train with --set data.drop_eval_duplicates=true to drop training images that duplicate a "
                 "validation or test image")
    return "\n".join(lines)
