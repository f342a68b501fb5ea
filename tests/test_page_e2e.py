"""The served page in real headless Chromium: upload a photo (and a webcam feed) and see faces rendered.

Needs Debian's `chromium` and `chromium-driver` plus the `selenium` package; skips with the reason otherwise.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server needs the serve extra")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")
pytest.importorskip("cv2", reason="the server detects faces with the detect extra")
pytest.importorskip("selenium", reason="the page test drives Chromium with selenium")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from fervit.data.dataset import CLASSES  # noqa: E402
from fervit.inference.annotate import COLOURS  # noqa: E402
from fervit.inference.predictor import Predictor  # noqa: E402
from fervit.serve.app import create_app  # noqa: E402
from test_predict import FACES, make_checkpoint, make_face_photo  # noqa: E402

pytestmark = pytest.mark.e2e  # a browser on the page a real server serves

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver", allow_module_level=True)

WAIT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free 127.0.0.1 port, in a background thread; yields its base URL."""
    import uvicorn

    predictor = Predictor.load(make_checkpoint(tmp_path_factory.mktemp("runs") / "tiny"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the OS picks the port: no clash with other test runs
    srv = uvicorn.Server(uvicorn.Config(create_app(predictor), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def photo(real_data, tmp_path_factory) -> Path:
    return make_face_photo(real_data, tmp_path_factory.mktemp("photos") / "three_faces.jpg")


def write_y4m(photo: Path, path: Path, frames: int = 2) -> Path:
    """A still video of `photo` for Chromium's fake webcam (YUV 4:2:0, the format it reads)."""
    im = Image.open(photo).convert("RGB")
    im = im.resize((im.width // 2 * 2, im.height // 2 * 2))
    y, u, v = im.convert("YCbCr").split()
    half = (im.width // 2, im.height // 2)
    frame = b"FRAME\n" + y.tobytes() + u.resize(half).tobytes() + v.resize(half).tobytes()
    path.write_bytes(f"YUV4MPEG2 W{im.width} H{im.height} F10:1 Ip A1:1 C420jpeg\n".encode() + frame * frames)
    return path


@pytest.fixture(scope="module")
def browser(photo, tmp_path_factory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    camera = write_y4m(photo, tmp_path_factory.mktemp("camera") / "camera.y4m")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={camera}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        pytest.fail(f"timed out waiting for {what}; the page's status line says: {status!r}")


def face_cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#results .face-card")


@pytest.mark.slow
def test_uploading_a_photo_renders_each_face_with_its_probability_bars(browser, server, photo):
    browser.get(server)
    wait_for(browser, lambda d: d.find_element(By.ID, "model").text.startswith("model: tiny/"), "the model name")
    browser.find_element(By.ID, "file-input").send_keys(str(photo))
    wait_for(browser, lambda d: len(face_cards(d)) == len(FACES), "one card per face")
    for card in face_cards(browser):
        assert card.find_element(By.CSS_SELECTOR, ".emotion").text in CLASSES
        rows = card.find_elements(By.CSS_SELECTOR, ".bar-row")
        assert [r.get_attribute("data-emotion") for r in rows] == list(CLASSES)
        total = sum(float(r.find_element(By.CSS_SELECTOR, ".bar").value_of_css_property("width")[:-2]) /
                    float(r.find_element(By.CSS_SELECTOR, ".bar-track").value_of_css_property("width")[:-2])
                    for r in rows)
        assert total == pytest.approx(1.0, abs=0.02)  # the bar lengths are the probabilities
    assert browser.find_element(By.ID, "status").text == f"{photo.name}: {len(FACES)} faces."
    # the photo is drawn with the boxes: the canvas holds the image at its size, not a blank
    width, height = browser.execute_script("const c = document.getElementById('view'); return [c.width, c.height];")
    assert (width, height) == (760, 400)


def test_a_non_image_upload_shows_the_api_error(browser, server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    browser.get(server)
    browser.find_element(By.ID, "file-input").send_keys(str(notes))
    status = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#status.error"), "the error message")
    assert "not an image" in status.text and face_cards(browser) == []


@pytest.mark.slow
def test_the_webcam_feed_is_labelled_live(browser, server):
    browser.get(server)
    browser.find_element(By.ID, "webcam-button").click()
    wait_for(browser, lambda d: len(face_cards(d)) == len(FACES), "one card per face in the webcam frame")
    assert browser.find_element(By.ID, "status").text.startswith(f"Webcam: {len(FACES)} faces · ")
    # live: frame after frame is sent, answered and drawn while the webcam is on
    wait_for(browser, lambda d: int(d.find_element(By.ID, "view").get_attribute("data-frames") or 0) >= 3,
             "three webcam frames")
    browser.find_element(By.ID, "webcam-button").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text == "Webcam off.", "the webcam to stop")


def test_the_canvas_shows_the_photo_with_boxes_drawn(browser, server, photo):
    browser.get(server)
    browser.find_element(By.ID, "file-input").send_keys(str(photo))
    wait_for(browser, lambda d: len(face_cards(d)) == len(FACES), "one card per face")
    _, x, y, s = FACES[0]
    pixels = browser.execute_script(  # only the first face's region: reading back the whole canvas is slow
        "return Array.from(document.getElementById('view').getContext('2d')"
        ".getImageData(arguments[0], arguments[1], arguments[2], arguments[3]).data);", x - 4, y, s + 8, s)
    drawn = np.array(pixels, dtype=np.uint8).reshape(s, s + 8, 4)[..., :3].astype(int)
    original = np.asarray(Image.open(photo).convert("RGB"), dtype=int)[y:y + s, x - 4:x + s + 4]
    assert np.abs(drawn[20:-20, 24:-24] - original[20:-20, 24:-24]).mean() < 8  # the photo itself
    emotion = face_cards(browser)[0].find_element(By.CSS_SELECTOR, ".emotion").text
    colour = np.array([int(COLOURS[emotion][i:i + 2], 16) for i in (1, 3, 5)])
    edge = drawn[s // 2, :9]  # the box's left edge, in the emotion's colour
    assert np.abs(edge - colour).sum(-1).min() < 30
