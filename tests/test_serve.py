"""`fervit serve` API: status codes for good and bad uploads, and the server keeps serving after bad ones."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the serve extra")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
pytest.importorskip("cv2", reason="the server detects faces with the detect extra")

from fastapi.testclient import TestClient  # noqa: E402

from fervit.data.dataset import CLASSES  # noqa: E402
from fervit.inference.predictor import Predictor  # noqa: E402
from fervit.serve.app import UploadLimits, create_app  # noqa: E402
from test_bad_images import TRUNCATED_IHDR_PNG, bomb_png  # noqa: E402
from test_predict import FACES, make_checkpoint, make_face_photo  # noqa: E402

LIMITS = UploadLimits(max_bytes=300_000, max_pixels=2_000_000)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    predictor = Predictor.load(make_checkpoint(tmp_path_factory.mktemp("runs") / "tiny"))
    with TestClient(create_app(predictor, LIMITS), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def photo_bytes(real_data, tmp_path_factory) -> bytes:
    return make_face_photo(real_data, tmp_path_factory.mktemp("photos") / "three_faces.jpg").read_bytes()


def upload(client, data: bytes, name: str = "photo.jpg", **params):
    return client.post("/predict", files={"file": (name, data, "image/jpeg")}, params=params)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")
    return buf.getvalue()


def test_health_names_the_model_and_classes(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["backend"] == "torch" and body["classes"] == list(CLASSES)
    assert body["temperature"] == 1.0  # a model file without calibration


def test_the_page_and_the_openapi_docs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file-input"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/health"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_a_photo_gets_every_face_with_a_box_and_probabilities(client, photo_bytes):
    r = upload(client, photo_bytes)
    assert r.status_code == 200
    body = r.json()
    assert (body["width"], body["height"], body["whole"]) == (760, 400, False)
    assert len(body["faces"]) == len(FACES)
    for face in body["faces"]:
        assert len(face["box"]) == 4 and face["emotion"] in CLASSES
        assert sum(face["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_a_face_crop_is_classified_whole(client, real_data):
    r = upload(client, (real_data / "test" / FACES[0][0]).read_bytes(), "face.jpg")
    assert r.status_code == 200
    assert r.json()["whole"] and r.json()["faces"][0]["box"] == [0, 0, 48, 48]


def test_a_photo_without_faces_returns_an_empty_list(client):
    assert upload(client, png(300, 200), "wall.png").json()["faces"] == []


@pytest.mark.parametrize("data, status, message", [
    (b"%PDF-1.4 not an image at all", 415, "not an image"),
    (b"", 400, "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, 400, "damaged PNG"),
    (bomb_png(20_000, 20_000), 413, "decompression bomb"),
    (TRUNCATED_IHDR_PNG, 400, "damaged PNG header"),
], ids=["pdf", "empty", "broken-png-header", "decompression-bomb", "truncated-ihdr"])
def test_bad_uploads_get_a_4xx_with_a_message(client, data, status, message):
    r = upload(client, data)
    assert r.status_code == status and message in r.json()["detail"]


def test_a_truncated_jpeg_is_a_400(client, photo_bytes):
    r = upload(client, photo_bytes[: len(photo_bytes) // 2])
    assert r.status_code == 400 and "damaged JPEG" in r.json()["detail"]


def test_an_upload_over_the_byte_limit_is_a_413(client):
    r = upload(client, b"\xff" * (LIMITS.max_bytes + 100_000))
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_a_chunked_upload_over_the_limit_is_a_413_too(client):
    def chunks():  # a generator body is sent chunked, without Content-Length
        boundary = b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
        yield boundary
        for _ in range(10):
            yield b"\0" * 100_000
        yield b"\r\n--x--\r\n"

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_an_image_over_the_pixel_limit_is_a_413(client):
    r = upload(client, png(2000, 1500), "huge.png")  # 3 MP, compresses to a few KB
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


def test_a_request_without_the_file_field_is_a_422(client):
    r = client.post("/predict", files={"image": ("a.jpg", b"123", "image/jpeg")})
    assert r.status_code == 422


def test_the_server_keeps_serving_after_bad_uploads(client, photo_bytes):
    for bad in (b"junk", photo_bytes[:1000], b"\xff" * (LIMITS.max_bytes + 1)):
        assert 400 <= upload(client, bad).status_code < 500
    assert upload(client, photo_bytes).status_code == 200


def test_concurrent_requests_are_all_answered_correctly(client, photo_bytes, real_data):
    face = (real_data / "test" / FACES[0][0]).read_bytes()
    jobs = [photo_bytes, face] * 4
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda data: upload(client, data), jobs))
    assert [r.status_code for r in responses] == [200] * len(jobs)
    assert [len(r.json()["faces"]) for r in responses] == [len(FACES), 1] * 4
    first = responses[0].json()["faces"][0]["probabilities"]
    assert all(np.isclose(r.json()["faces"][0]["probabilities"]["happy"], first["happy"]) for r in responses[::2])
