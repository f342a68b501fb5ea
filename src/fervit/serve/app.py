"""The web app behind `fervit serve`: one page plus the JSON API the page itself calls.

The model is loaded once, before the app is built; requests run in FastAPI's thread pool and the
detector + forward pass are serialised by one lock (two CPU forwards at once would only contend
for the same cores, and the OpenCV cascade is not thread-safe). Decoding happens outside the lock,
but only a few uploads are decoded at once (`DecodePool`), so memory is bounded whatever the
number of clients: a 25 MP upload of a few KB decodes to hundreds of MB.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
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
    max_decoding: int = 0  # uploads decoded and classified at once; 0: the cores, at most 4
    max_waiting: int = 32  # uploads queued for a decoding slot; beyond that the answer is 503

    def decoding_slots(self) -> int:
        return self.max_decoding or min(4, os.cpu_count() or 1)


class DecodePool:
    """Uploads are decoded and classified on `size` dedicated threads, with at most `waiting` more queued;
    the rest get 503 + Retry-After.

    A decoded 25 MP upload holds about 200 MB (RGB, its gray copy, the detector's copy). Bounding how many
    are decoded at once bounds the peak, and doing it on a few fixed threads bounds what stays behind:
    the C allocator keeps freed memory per thread, so decoding on each of the server's 40 request
    threads in turn left gigabytes resident.
    """

    def __init__(self, size: int, waiting: int):
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="fervit-decode")
        self._lock = threading.Lock()
        self._admitted, self.limit = 0, size + waiting

    def run(self, fn, *args):
        """fn(*args) on a decoding thread, once one is free; HTTP 503 when the queue is full."""
        with self._lock:
            if self._admitted >= self.limit:
                raise HTTPException(503, "the server is busy with other images; retry in a moment",
                                    headers={"Retry-After": "1"})
            self._admitted += 1
        try:
            return self._pool.submit(fn, *args).result()
        finally:
            with self._lock:
                self._admitted -= 1


class FaceOut(BaseModel):
    box: list[int]  # [x, y, w, h] in the upright image's pixels
    emotion: str
    probabilities: dict[str, float]  # calibrated (see /health's temperature)


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
    temperature: float  # probabilities are softmax(logits / temperature); 1 for an uncalibrated model


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
    decoders = DecodePool(limits.decoding_slots(), limits.max_waiting)
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
                "backend": predictor.backend, "classes": predictor.classes, "temperature": predictor.temperature}

    @app.post("/predict", response_model=PredictOut, summary="Faces and emotion probabilities in one image",
              responses={400: {"model": ErrorOut, "description": "empty or damaged image"},
                         413: {"model": ErrorOut, "description": "too many bytes or pixels"},
                         415: {"model": ErrorOut, "description": "not an image"},
                         503: {"model": ErrorOut, "description": "busy: too many uploads at once; retry after "
                                                                 "the Retry-After header's seconds"}})
    def predict(file: UploadFile = File(..., description="the photo (jpeg, png, webp, bmp, gif, tiff); not empty",
                                        json_schema_extra={"minLength": 1}),
                detect: Literal["auto", "always", "never"] = Query(
                    "auto", description="auto: images up to 128 px are face crops; never: classify the whole image")):
        return decoders.run(classify_upload, file, detect)  # a bounded number decoded at once

    def classify_upload(file: UploadFile, detect: str) -> dict:
        data = file.file.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise HTTPException(413, f"upload is larger than {limits.max_bytes // 2**20} MB")
        if not data:  # the schema says minLength 1, which FastAPI does not check for files
            raise HTTPException(400, "the upload is empty; send an image in the multipart field 'file'")
        try:
            image = open_image(data, limits.max_pixels)
        except ImageError as e:
            raise HTTPException(STATUS.get(e.kind, 400), str(e)) from None
        with lock:
            result = predictor.predict_images([(file.filename or "upload", image)], detect)[0]
        return {**result.to_dict(), "width": image.width, "height": image.height, "whole": result.whole}

    return app
