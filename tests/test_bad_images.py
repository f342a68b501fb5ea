"""Hostile and odd image files: bombs, broken headers, 16-bit and float pixels, EPS in disguise, FIFOs, links.

Each is a clean per-file outcome (an `ImageError` / a reported skip), never a traceback or a wrong value.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fervit.cli import main
from fervit.data.dataset import decode_image
from fervit.inference.faces import ImageError, open_image, to_gray
from test_predict import make_checkpoint


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid grayscale PNG header declaring width x height pixels, with one compressed row of zeros:
    Pillow reads the header (and the bomb check runs) before any pixel is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + png_chunk(b"IEND", b""))


TRUNCATED_IHDR_PNG = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", b"\0\0\0\x30\0\0")  # 6 of its 13 bytes


def gradient(dtype, top: float) -> np.ndarray:
    """A 48x48 left-to-right ramp from 0 to `top`."""
    return np.tile(np.linspace(0, top, 48), (48, 1)).astype(dtype)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("runs") / "tiny")


def test_a_decompression_bomb_is_too_large_not_a_crash():
    with pytest.raises(ImageError, match="too large.*decompression bomb") as err:
        open_image(bomb_png(20_000, 20_000))  # 400 MP: over Pillow's own 179 MP bomb limit
    assert err.value.kind == "too_large"


def test_an_image_between_the_limits_is_refused_by_fervits_pixel_count():
    with pytest.raises(ImageError, match="too large: 10000x10000 pixels is more than the 25 MP limit") as err:
        open_image(bomb_png(10_000, 10_000), max_pixels=25_000_000)
    assert err.value.kind == "too_large"


def test_a_png_with_a_truncated_ihdr_is_a_damaged_image():
    with pytest.raises(ImageError, match="damaged PNG header") as err:
        open_image(TRUNCATED_IHDR_PNG)
    assert err.value.kind == "damaged"


def test_predict_reports_bombs_per_file_and_classifies_the_rest(capsys, checkpoint, tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(20_000, 20_000))
    (tmp_path / "ihdr.png").write_bytes(TRUNCATED_IHDR_PNG)
    Image.fromarray(gradient(np.uint8, 255)).save(tmp_path / "face.png")
    code = main(["predict", "--json", "--no-detect", str(tmp_path), "--model", str(checkpoint)])
    by_file = {Path(r["file"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert code == 1
    assert "decompression bomb" in by_file["bomb.png"]["error"]
    assert "damaged PNG header" in by_file["ihdr.png"]["error"]
    assert len(by_file["face.png"]["faces"]) == 1 and "error" not in by_file["face.png"]


@pytest.mark.parametrize("pixels, mode, fmt", [
    (gradient(np.uint16, 65535), "I;16", "PNG"),
    (gradient(np.float32, 1.0), "F", "TIFF"),
], ids=["16-bit-png", "float-tiff"])
def test_16bit_and_float_images_are_scaled_to_8bit_in_training_and_predict(pixels, mode, fmt):
    image = Image.fromarray(pixels)
    assert image.mode == mode
    data = encoded(image, fmt)
    expected = gradient(np.uint8, 255)
    trained = decode_image(io.BytesIO(data))
    predicted = np.asarray(to_gray(open_image(data)))
    assert np.abs(trained.astype(int) - expected).max() <= 1  # a ramp from black to white, not clipped at 255
    np.testing.assert_array_equal(predicted, trained)


def test_the_training_decoder_refuses_an_eps_file_named_jpg(tmp_path):
    eps = tmp_path / "face.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 48\nshowpage\n")
    with pytest.raises(Exception, match="cannot identify image file"):
        decode_image(eps)  # Pillow's EPS plugin (and Ghostscript) is never reached


def test_the_training_decoder_refuses_a_bomb_before_decoding(tmp_path):
    with pytest.raises(ValueError, match="too large: 10000x10000 pixels"):
        decode_image(io.BytesIO(bomb_png(10_000, 10_000)))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_predict_skips_a_fifo_instead_of_hanging(capsys, checkpoint, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    code = main(["predict", "--json", "--no-detect", str(tmp_path / "pipe.png"), "--model", str(checkpoint)])
    [result] = json.loads(capsys.readouterr().out)
    assert code == 1 and result["error"] == "not a regular file (a FIFO, socket or device); skipped"


def test_predict_reports_broken_links_and_link_loops_in_a_folder(capsys, checkpoint, tmp_path):
    Image.fromarray(gradient(np.uint8, 255)).save(tmp_path / "face.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    code = main(["predict", "--json", "--no-detect", str(tmp_path), "--model", str(checkpoint)])
    by_file = {Path(r["file"]).name: r.get("error") for r in json.loads(capsys.readouterr().out)}
    assert code == 1
    assert by_file == {"face.png": None, "gone.png": "broken symbolic link", "loop.png": "symbolic link loop"}


def test_annotate_pointing_at_an_existing_file_is_one_clear_error(capsys, checkpoint, tmp_path):
    Image.fromarray(gradient(np.uint8, 255)).save(tmp_path / "face.png")
    (tmp_path / "out.txt").write_text("not a folder")
    code = main(["predict", str(tmp_path / "face.png"), "--model", str(checkpoint), "--annotate",
                 str(tmp_path / "out.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "--annotate needs a folder, and" in err and "out.txt' is a file" in err
    assert "Traceback" not in err
