"""Draw face boxes and emotion labels onto a copy of a photo (`fervit predict --annotate`)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# one colour per class, in CLASSES order; the web page uses the same palette
COLOURS = {"angry": "#e6194b", "disgusted": "#3cb44b", "fearful": "#911eb4", "happy": "#ffc119",
           "neutral": "#a9a9a9", "sad": "#4363d8", "surprised": "#f58231"}
SAVE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def draw_faces(image: Image.Image, faces, prefixes: list[str] | None = None) -> Image.Image:
    """An RGB copy of `image` with each face's box and "emotion p%" label (after its prefix, e.g. a video's
    track id "#2", when given)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    line = max(2, round(min(out.size) / 200))
    font = _font(max(11, round(min(out.size) / 30)))
    for i, face in enumerate(faces):
        x, y, w, h = face.box.as_list()
        colour = COLOURS.get(face.emotion, "#ffffff")
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour, width=line)
        label = f"{prefixes[i] + ' ' if prefixes else ''}{face.emotion} {face.probabilities[face.emotion]:.0%}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        ty = y - (bottom - top) - 2 * line if y - (bottom - top) - 2 * line >= 0 else y + h  # above the box if room
        draw.rectangle((x, ty, x + right - left + 2 * line, ty + bottom - top + 2 * line), fill=colour)
        draw.text((x + line - left, ty + line - top), label, fill="black", font=font)
    return out


def annotated_path(out_dir: Path, name: str, used: set[str]) -> Path:
    """DIR/<input file name>, made unique when two inputs share a name or DIR holds a file of that name already
    (an existing file is never replaced); stdin and odd formats become .png."""
    src = Path("stdin.png" if name == "-" else name)
    suffix = src.suffix.lower() if src.suffix.lower() in SAVE_SUFFIXES else ".png"
    stem, n = src.stem, 1
    candidate = f"{stem}{suffix}"
    while candidate in used or os.path.lexists(out_dir / candidate):
        n += 1
        candidate = f"{stem}_{n}{suffix}"
    used.add(candidate)
    return out_dir / candidate


def save_annotated(image: Image.Image, out_dir: Path, name: str, used: set[str]) -> Path:
    """Write `image` as a new file in `out_dir` (named by `annotated_path`); opened exclusively, so a file that
    appears meanwhile is not replaced either. Returns its path."""
    while True:
        target = annotated_path(out_dir, name, used)
        try:
            with open(target, "xb") as f:
                image.save(f, format=Image.registered_extensions()[target.suffix])
            return target
        except FileExistsError:
            continue
