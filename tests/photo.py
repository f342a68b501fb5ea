"""The demo photo of the predict, serve and video tests: three real FER-2013 faces on a textured background.

    python tests/photo.py three_faces.jpg [--data ROOT]

writes it for the inference speed bench (`python -m fervit.benchmark.inference_speed --photo ...`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (file under test/, x, y, side): three PrivateTest faces, labelled happy, surprised and neutral in FER-2013
FACES = [("happy/PrivateTest_10077120.jpg", 60, 90, 144),
         ("surprised/PrivateTest_10089743.jpg", 300, 60, 176),
         ("neutral/PrivateTest_10086748.jpg", 560, 120, 128)]


def make_face_photo(data_root: Path, path: Path) -> Path:
    """A 760x400 colour 'photo': the three FACES, upscaled, on a textured background; saved as JPEG at `path`."""
    rng = np.random.default_rng(0)
    background = rng.normal((80, 130, 190), 12, (400, 760, 3)).clip(0, 255).astype(np.uint8)
    photo = Image.fromarray(background)
    for rel, x, y, s in FACES:
        face = Image.open(Path(data_root) / "test" / rel).convert("RGB").resize((s, s), Image.Resampling.BILINEAR)
        photo.paste(face, (x, y))
    photo.save(path, quality=95)
    return path


if __name__ == "__main__":
    import argparse

    from fervit.data.location import resolve_data_root

    ap = argparse.ArgumentParser(description="write the three-face demo photo")
    ap.add_argument("out", type=Path, help="where the JPEG goes")
    ap.add_argument("--data", default="", help="FER-2013 root (default: as fervit resolves it)")
    args = ap.parse_args()
    from fervit.errors import FervitError

    try:
        print(make_face_photo(Path(resolve_data_root(args.data)), args.out))
    except FervitError as e:
        raise SystemExit(f"photo.py: error: {e}") from None
