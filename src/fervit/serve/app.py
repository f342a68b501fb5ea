"""The web app behind `fervit serve`: one page plus the JSON API the page itself calls.

The model is loaded once, before the app is built; requests run in FastAPI's thread pool and the
detector + forward pass are serialised by one lock (two CPU forwards at once would only contend
for the same cores, and the OpenCV cascade is not thread-safe). Decoding happens outside the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from fervit import __version__
from fervit.errors import FervitError
from fervit.inference.faces import ImageError, open_image
from fervit.inference.predictor import Predictor

STATIC = Path(__file__).parent / "static"
# HTTP status per ImageError.kind: a malformed upload is the client's fault, never a 500
STATUS = {"not_image": 415, "too_large": 413, "damaged": 400, "missing": 400}


@dataclass
class UploadLimits:
    """What one upload may be: its size in bytes, and the pixel count it decodes to."""

    max_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000


class FaceOut(BaseModel):
    box: list[int]  # [x, y, w, h] in the upright image's pixels
    emotion: str
    probabilities: dict[str, float]


class PredictOut(BaseModel):
    file: str
    width: int
    height: int
    whole: bool  # classified as a face crop, without detection
    faces: list[FaceOut]


class HealthOut(BaseModel):
    status: str
    model: str
    backend: str
    classes: list[str]


class ErrorOut(BaseModel):
    detail: str


class BodySizeLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413, before it is parsed or spooled."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": f"upload is larger than {self.max_bytes // 2**20} MB"}, 413)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # chunked uploads carry no Content-Length to check up front
                raise HTTPException(413, f"upload is larger than {self.max_bytes // 2**20} MB")
            return message

        return await self.app(scope, counted_receive, send)


def create_app(predictor: Predictor, limits: UploadLimits | None = None) -> FastAPI:
    """The app around an already-loaded predictor."""
    limits = limits or UploadLimits()
    if not (STATIC / "index.html").is_file():
        raise FervitError(f"the web page's files are missing from this install ({STATIC}); reinstall fervit")
    lock = threading.Lock()
    app = FastAPI(title="fervit", version=__version__,
                  description="Facial emotion recognition: upload a photo, get every face's box and the "
                              f"probability of each of {len(predictor.classes)} emotions.")
    # multipart framing adds a few hundred bytes around the file itself
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_bytes + 64 * 1024)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", response_model=HealthOut, summary="Is the model loaded")
    def health():
        source = predictor.source
        return {"status": "ok", "model": f"{source.parent.name}/{source.name}" if source else "?",
                "backend": predictor.backend, "classes": predictor.classes}

    @app.post("/predict", response_model=PredictOut, summary="Faces and emotion probabilities in one image",
              responses={400: {"model": ErrorOut, "description": "empty or damaged image"},
                         413: {"model": ErrorOut, "description": "too many bytes or pixels"},
                         415: {"model": ErrorOut, "description": "not an image"}})
    def predict(file: UploadFile = File(..., description="the photo (jpeg, png, webp, bmp, gif, tiff)"),
                detect: Literal["auto", "always", "never"] = Query(
                    "auto", description="auto: images up to 128 px are face crops; never: classify the whole image")):
        data = file.file.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise HTTPException(413, f"upload is larger than {limits.max_bytes // 2**20} MB")
        if not data:
            raise HTTPException(400, "the upload is empty; send an image in the multipart field 'file'")
        try:
            image = open_image(data, limits.max_pixels)
        except ImageError as e:
            raise HTTPException(STATUS.get(e.kind, 400), str(e)) from None
        with lock:
            result = predictor.predict_images([(file.filename or "upload", image)], detect)[0]
        return {**result.to_dict(), "width": image.width, "height": image.height, "whole": result.whole}

    return app
