"""The one way from an image to the model's input: a 48x48 uint8 grey face, shared by training and inference.

Training decodes its files with `decode_image`; `fervit predict` and `fervit serve` open photos themselves
(EXIF orientation, per-file errors) and then take `to_gray` and `to_face` from here, so a face crop fed
to `predict` gives the very pixels training saw.
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

IMG_SIZE = 48
# Formats an image may be in, told by Pillow from its bytes (never the extension): training and `predict` read
# the same ones. JPEG covers cameras' MPO files; PIL would also open EPS (through Ghostscript) and other rarities.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_PIXELS = 50_000_000  # a 50 MP photo decodes to 150 MB of RGB; larger is refused before decoding
# fervit refuses images over its own, smaller pixel limit before decoding them, so Pillow's bomb warning
# (issued at 89 MP, before fervit's check can run) only adds noise
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
MEAN, STD = 0.5, 0.5  # pixel normalisation shared by training, evaluation and inference


def normalize(images_u8, mean: float = MEAN, std: float = STD):
    """(B, H, W) uint8 -> (B, 1, H, W) float32, (x/255 - mean) / std: the deterministic eval transform.

    A numpy array gives a numpy array (the ONNX Runtime predictor, which never imports torch), a torch tensor a
    tensor on its device, with the same float32 operations in the same order. Inference passes the mean and std
    its model file records; fervit trains with MEAN and STD ([-1, 1]).
    """
    if isinstance(images_u8, np.ndarray):
        x = images_u8[:, None].astype(np.float32) / np.float32(255.0)
        return (x - np.float32(mean)) / np.float32(std)
    return (images_u8.unsqueeze(1).float() / 255.0 - mean) / std


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images scaled (not clipped) to mode L; other modes unchanged.

    Integer images are taken as 16-bit (x/257), which is what PNG and TIFF store; floats in [0, 1] are
    x*255, floats in [0, 255] are kept, and any other range is stretched from its own min to its max.
    """
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im
    arr = np.asarray(im).astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size and np.isfinite(arr).all() else (0.0, 0.0)
    if im.mode != "F" and lo >= 0 and hi <= 65535:
        scale, offset = 1 / 257, 0.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        scale, offset = 255.0, 0.0
    elif im.mode == "F" and lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    else:  # an unusual range (negative values, 32-bit counts, NaN): stretch what is there
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        scale, offset = (255.0 / (hi - lo) if hi > lo else 0.0), lo
    return Image.fromarray(np.clip(np.rint((arr - offset) * scale), 0, 255).astype(np.uint8), "L")


def check_pixels(im: Image.Image, max_pixels: int = MAX_PIXELS) -> None:
    """ValueError when `im` declares more than `max_pixels`, checked before its pixels are decoded."""
    w, h = im.size
    if w * h > max_pixels:
        raise ValueError(f"too large: {w}x{h} pixels is more than the {max_pixels / 1e6:g} MP limit")


def to_gray(im: Image.Image) -> Image.Image:
    """Mode L as training converts: 16-bit/float scaled to 8 bits, palette and alpha images through RGB first."""
    im = to_8bit(im)
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGBA").convert("RGB") if "A" in im.mode or im.mode == "P" else im.convert("RGB")
    return im.convert("L")


def to_face(gray: Image.Image) -> np.ndarray:
    """A grayscale face image -> (48, 48) uint8, resized bilinearly as FER-2013's own faces are kept."""
    if gray.size != (IMG_SIZE, IMG_SIZE):
        gray = gray.resize((IMG_SIZE, IMG_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def decode_image(source) -> np.ndarray:
    """An image (path or file object) in one of `IMAGE_FORMATS` as a (48, 48) uint8 grayscale array."""
    with Image.open(source, formats=IMAGE_FORMATS) as im:
        check_pixels(im)
        im.load()
        return to_face(to_gray(im))
