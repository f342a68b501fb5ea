"""Read photos, find the faces in them, and cut each face out the way FER-2013's faces were made.

FER-2013 was itself built by running an OpenCV face detector over web images, so the Haar cascade
that ships inside OpenCV's wheel frames a face almost exactly like a training image. `MARGIN` was
measured: over 148 FER test faces pasted onto textured photos at 100-200 px, the crop's mean
absolute difference from the original training image is lowest at 0-2% extra per side (26.5
grey levels, against 28.7 at 4% and 28.2 at -2%), so we add 1%. `face_crop` then converts to
48x48 grayscale with training's own `fervit.data.images.to_gray` and `to_face`.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fervit.data.images import IMAGE_FORMATS, MAX_PIXELS, check_pixels, to_8bit, to_face, to_gray
from fervit.errors import FervitError

FACE_CROP_MAX_SIDE = 128  # images whose longer side is at most this are taken to be face crops already
MARGIN = 0.01  # fraction of the box added on every side: a Haar box is already framed like FER-2013
CASCADE = "haarcascade_frontalface_alt2.xml"
DETECT_MAX_SIDE = 960  # photos are shrunk to this for detection (speed); faces are cut from the full image


class ImageError(Exception):
    """One input could not be used as an image; the message is the per-file report.

    `kind` says why, for callers that map it to a status: missing, not_image, too_large or damaged.
    """

    def __init__(self, message: str, kind: str = "damaged"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Box:
    """A face rectangle in the (EXIF-rotated) image's pixel coordinates."""

    x: int
    y: int
    w: int
    h: int

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


def open_image(source: str | Path | bytes | BinaryIO, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode a photo (path, bytes or file object), upright per its EXIF orientation; `ImageError` if unusable.

    Only regular files are opened (a FIFO would block forever), and the pixel count is checked before decoding.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, (str, Path)):
        check_regular_file(Path(source))
    try:
        im = Image.open(source, formats=IMAGE_FORMATS)
    except FileNotFoundError:
        raise ImageError("no such file", "missing") from None
    except IsADirectoryError:
        raise ImageError("is a folder", "missing") from None
    except Image.DecompressionBombError:
        raise ImageError(f"too large: it declares far more pixels than the {max_pixels / 1e6:g} MP limit "
                         "(a decompression bomb)", "too_large") from None
    except UnidentifiedImageError:
        fmt = _signature(source)
        if fmt:
            raise ImageError(f"damaged {fmt} image (its header cannot be read)") from None
        raise ImageError("not an image (readable: jpeg, png, webp, bmp, gif, tiff)", "not_image") from None
    except OSError as e:
        raise ImageError(f"cannot read ({e.strerror or e})") from None
    except Exception as e:  # Pillow's plugins raise ValueError, SyntaxError, struct.error... on malformed headers
        raise ImageError(f"damaged {_signature(source) or 'image'} header ({e})") from None
    try:
        check_pixels(im, max_pixels)  # the training decoder's limit check, before any pixel is decoded
    except ValueError as e:
        im.close()
        raise ImageError(str(e), "too_large") from None
    try:
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: a copy of a 25 MP photo is another 75 MB
        im = to_8bit(im)
    except Exception as e:  # as above: any failure to decode is this one file's problem
        raise ImageError(f"damaged {im.format} image ({e})") from None
    return im


def check_regular_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError("broken symbolic link" if path.is_symlink() else "no such file", "missing") from None
    except OSError as e:
        why = "symbolic link loop" if e.errno == errno.ELOOP else f"cannot read ({e.strerror or e})"
        raise ImageError(why, "missing") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a folder", "missing")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file (a FIFO, socket or device); skipped", "not_image")
    if not os.access(path, os.R_OK):
        raise ImageError("cannot read (permission denied)", "missing")


SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF",
              b"MM\x00*": "TIFF"}


def _signature(source) -> str | None:
    """The format a file's first bytes claim, to tell a damaged image from something that is no image at all."""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                head = f.read(12)
        else:
            source.seek(0)
            head = source.read(12)
    except (OSError, AttributeError):
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in SIGNATURES.items() if head.startswith(magic)), None)


def face_crop(gray: Image.Image, box: Box, margin: float = MARGIN) -> np.ndarray:
    """Cut `box` plus `margin` from a mode-L image as a (48, 48) uint8 face; edges are extended past the border."""
    pad_x, pad_y = round(box.w * margin), round(box.h * margin)
    x0, y0 = box.x - pad_x, box.y - pad_y
    x1, y1 = box.x + box.w + pad_x, box.y + box.h + pad_y
    W, H = gray.size
    inside = gray.crop((max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)))
    if (x0, y0, x1, y1) != (max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)):
        # replicate edge pixels rather than pad with black: black borders never occur in training faces
        arr = np.pad(np.asarray(inside), ((max(-y0, 0), max(y1 - H, 0)), (max(-x0, 0), max(x1 - W, 0))), mode="edge")
        inside = Image.fromarray(arr)
    return to_face(inside)


def is_face_crop(im: Image.Image) -> bool:
    """Small images (FER's own 48x48 faces, thumbnails) are classified whole instead of searched for faces."""
    return max(im.size) <= FACE_CROP_MAX_SIDE


class FaceDetector:
    """OpenCV's frontal-face Haar cascade (shipped in the opencv-python wheel), boxes sorted left to right.

    Not thread-safe: callers that share one detector across threads serialise their calls.
    """

    def __init__(self, cascade: str = CASCADE, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_face: int = 24, max_side: int = DETECT_MAX_SIDE):
        try:
            import cv2
        except ImportError:
            raise FervitError("face detection needs OpenCV: pip install 'fervit[detect]' "
                              "(or pass --no-detect for images that are already face crops)") from None
        path = cascade if Path(cascade).is_file() else str(Path(cv2.data.haarcascades) / cascade)
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise FervitError(f"cannot load the face detector '{path}'; reinstall opencv-python-headless<5 "
                              "(OpenCV 5 wheels no longer ship the Haar cascades)")
        self.scale_factor, self.min_neighbors, self.min_face, self.max_side = \
            scale_factor, min_neighbors, min_face, max_side

    def __call__(self, gray: Image.Image) -> list[Box]:
        """Faces in a mode-L image, in its own pixel coordinates."""
        scale = min(1.0, self.max_side / max(gray.size))
        small = gray if scale == 1.0 else gray.resize(
            (max(1, round(gray.width * scale)), max(1, round(gray.height * scale))), Image.Resampling.BILINEAR)
        found = self._cascade.detectMultiScale(np.asarray(small), scaleFactor=self.scale_factor,
                                               minNeighbors=self.min_neighbors,
                                               minSize=(self.min_face, self.min_face))
        boxes = [Box(*(round(int(v) / scale) for v in b)) for b in found]
        return sorted(boxes, key=lambda b: (b.x, b.y))
