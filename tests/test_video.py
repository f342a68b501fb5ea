"""`fervit predict clip.mp4` and `--webcam`: short videos built from real FER-2013 faces, classified per
frame with face track ids; bad, cut-short and damaged videos; no camera on this machine."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2", reason="videos need the detect extra (opencv-python-headless)")

from photo import FACES  # noqa: E402
from fervit.cli import main  # noqa: E402
from fervit.data.dataset import CLASSES  # noqa: E402
from fervit.inference.faces import Box  # noqa: E402
from fervit.inference.video import Tracker  # noqa: E402
from test_predict import iou, make_checkpoint  # noqa: E402

FPS, N_FRAMES, DRIFT = 10, 12, 3  # the photo video: 1.2 s, its faces move 3 px right per frame

# fixtures that take over 5 s to build: conftest marks every test that needs one slow
SLOW_FIXTURES = {"face_video", "clip_run"}


def write_video(path: Path, frames: list[np.ndarray], fps: float, fourcc: str) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, frames[0].shape[1::-1])
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def face_video(real_data, tmp_path_factory) -> Path:
    """An MP4 of the demo photo (three PrivateTest faces on a textured 760x400 background), faces drifting."""
    rng = np.random.default_rng(0)
    background = rng.normal((80, 130, 190), 12, (400, 760, 3)).clip(0, 255).astype(np.uint8)
    faces = [(Image.open(real_data / "test" / rel).convert("RGB").resize((s, s), Image.Resampling.BILINEAR), x, y)
             for rel, x, y, s in FACES]
    frames = []
    for i in range(N_FRAMES):
        frame = Image.fromarray(background)
        for face, x, y in faces:
            frame.paste(face, (x + DRIFT * i, y))
        frames.append(np.asarray(frame))
    return write_video(tmp_path_factory.mktemp("videos") / "clip.mp4", frames, FPS, "mp4v")


def crop_frames(real_data, n: int = 20) -> list[np.ndarray]:
    """48x48 frames, each a different real FER test face: the whole frame is the face."""
    paths = sorted((real_data / "test" / "happy").glob("*.jpg"))[:n]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


@pytest.fixture(scope="module")
def crop_avi(real_data, tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("crops") / "crops.avi", crop_frames(real_data), 5, "MJPG")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="module")
def clip_run(face_video, checkpoint, tmp_path_factory):
    """`fervit predict clip.mp4 --json --out DIR`: (exit status, the JSON printed, DIR)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["predict", str(face_video), "--json", "--model", str(checkpoint), "--out", str(out)])
    return code, json.loads(printed.getvalue()), out


def test_every_face_of_every_frame_is_classified_with_a_time_stamp_and_a_stable_track(clip_run):
    code, [video], _ = clip_run
    assert code == 0 and "error" not in video and "problem" not in video
    assert video["classified_frames"] == video["decoded_frames"] == video["declared_frames"] == N_FRAMES
    assert video["fps"] == FPS and (video["width"], video["height"]) == (760, 400)
    seen = {}  # FACES index -> the track ids it was given
    for i, frame in enumerate(video["frames"]):
        assert frame["frame"] == i and frame["time_s"] == pytest.approx(i / FPS, abs=1e-3)
        for face in frame["faces"]:
            assert list(face["probabilities"]) == list(CLASSES)
            assert sum(face["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
            overlaps = [iou(face["box"], (x + DRIFT * i, y, s, s)) for _, x, y, s in FACES]
            assert max(overlaps) > 0.7  # every box is one of the three real faces, where it is in this frame
            seen.setdefault(int(np.argmax(overlaps)), set()).add(face["track"])
    assert sorted(seen) == [0, 1, 2]
    assert all(len(ids) == 1 for ids in seen.values())  # each face keeps one track id throughout
    assert sorted(t["track"] for t in video["tracks"]) == sorted(next(iter(ids)) for ids in seen.values())
    found = sum(len(f["faces"]) for f in video["frames"])
    assert found >= 0.8 * 3 * N_FRAMES  # the cascade finds nearly every face of every frame


def test_a_video_gets_its_own_folder_with_json_csv_annotated_video_and_timeline(clip_run, face_video):
    _, [video], out = clip_run
    folder = out / "clip_emotions"
    assert sorted(p.name for p in folder.iterdir()) == ["clip.csv", "clip.json", "clip_annotated.mp4",
                                                        "clip_timeline.png"]
    assert json.loads((folder / "clip.json").read_text()) == video
    rows = list(csv.DictReader(open(folder / "clip.csv")))
    assert list(rows[0]) == ["file", "frame", "time_s", "track", "x", "y", "w", "h", "emotion", *CLASSES, "note"]
    assert len(rows) == sum(max(len(f["faces"]), 1) for f in video["frames"])
    assert {r["track"] for r in rows if r["track"]} == {str(t["track"]) for t in video["tracks"]}
    annotated = cv2.VideoCapture(str(folder / "clip_annotated.mp4"))
    assert annotated.get(cv2.CAP_PROP_FRAME_COUNT) == N_FRAMES
    ok, first = annotated.read()
    original = cv2.VideoCapture(str(face_video)).read()[1]
    x, y, w, h = video["frames"][0]["faces"][0]["box"]
    diff = np.abs(first.astype(int) - original.astype(int)).sum(-1)
    assert ok and diff[y + h // 4:y + h, x:x + 2].mean() > 60  # the first face's box is drawn (below its label)
    assert diff[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4].mean() < 30  # and the face left as it was
    with Image.open(folder / "clip_timeline.png") as im:
        assert im.format == "PNG" and im.height > 3 * 150  # a panel per face track


@pytest.mark.slow
def test_every_n_classifies_one_frame_in_n_at_its_own_time(face_video, checkpoint, tmp_path, capsys):
    assert main(["predict", str(face_video), "--json", "--every", "4", "--model", str(checkpoint),
                 "--out", str(tmp_path)]) == 0
    [video] = json.loads(capsys.readouterr().out)
    assert [f["frame"] for f in video["frames"]] == [0, 4, 8]
    assert [f["time_s"] for f in video["frames"]] == pytest.approx([0.0, 0.4, 0.8], abs=1e-3)
    assert video["decoded_frames"] == N_FRAMES and video["every"] == 4
    annotated = cv2.VideoCapture(str(tmp_path / "clip_emotions" / "clip_annotated.mp4"))
    assert annotated.get(cv2.CAP_PROP_FRAME_COUNT) == 3 and annotated.get(cv2.CAP_PROP_FPS) == pytest.approx(2.5)


def test_small_frames_are_faces_whole_and_the_table_names_the_folder(crop_avi, checkpoint, tmp_path, capsys):
    assert main(["predict", str(crop_avi), "--model", str(checkpoint), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{crop_avi}: 20 frames at 5 fps") and "1 face track" in out[0]
    assert out[0].endswith(f"-> {tmp_path / 'crops_emotions'}/")
    assert out[2].split()[:2] == ["#1", "20"]  # the whole frame is one face, tracked from start to end
    frames = json.loads((tmp_path / "crops_emotions" / "crops.json").read_text())["frames"]
    assert all(f["faces"][0]["box"] == [0, 0, 48, 48] for f in frames)


def test_outputs_never_overwrite_the_input_or_an_earlier_run(crop_avi, checkpoint, tmp_path, capsys):
    video = tmp_path / crop_avi.name
    video.write_bytes(crop_avi.read_bytes())
    before = video.read_bytes()
    (tmp_path / "crops_emotions").mkdir()
    (tmp_path / "crops_emotions" / "crops.json").write_text("mine")
    for _ in range(2):
        assert main(["predict", str(video), "--model", str(checkpoint), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "crops_emotions" / "crops.json").read_text() == "mine"
    assert (tmp_path / "crops_emotions_2" / "crops.json").is_file()
    assert (tmp_path / "crops_emotions_3" / "crops.json").is_file()
    assert video.read_bytes() == before
    assert "-> " + str(tmp_path / "crops_emotions_3") in capsys.readouterr().out


def one_line(capfd) -> str:
    """stderr at the file-descriptor level: OpenCV's and FFmpeg's own complaints would show up here too."""
    err = capfd.readouterr().err.strip()
    assert "Traceback" not in err and "WARN" not in err and "moov" not in err, err
    return err


def test_a_file_that_is_no_video_or_cut_before_its_index_is_one_line_and_makes_no_folder(
        face_video, checkpoint, tmp_path, capfd):
    (tmp_path / "notes.mp4").write_text("not a video")
    (tmp_path / "cut.mp4").write_bytes(face_video.read_bytes()[:5000])  # an MP4's index comes last
    for name in ("notes.mp4", "cut.mp4", "missing.mp4"):
        assert main(["predict", str(tmp_path / name), "--model", str(checkpoint), "--out", str(tmp_path / "o")]) == 1
        err = one_line(capfd).splitlines()
        assert len(err) == 2 and err[1] == "fervit: 1 of 1 video(s) could not be read in full"
        assert err[0].startswith(f"fervit: {tmp_path / name}: ")
        assert ("no such file" if name == "missing.mp4" else "not a readable video") in err[0]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_a_cut_short_video_reports_where_it_ends_and_keeps_the_frames_before(crop_avi, checkpoint, tmp_path, capfd):
    data = crop_avi.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:len(data) // 2])
    assert main(["predict", str(cut), "--model", str(checkpoint), "--out", str(tmp_path)]) == 1
    err = one_line(capfd)
    video = json.loads((tmp_path / "cut_emotions" / "cut.json").read_text())
    n = video["classified_frames"]
    assert 3 <= n < 20 and video["unreadable_frames"] == 20 - n
    assert f"the video ends after frame {n} of the 20 its header declares" in video["problem"]
    assert f"fervit: {cut}: the video ends after frame {n} of the 20" in err


def test_unreadable_frames_in_the_middle_are_skipped_and_counted(crop_avi, checkpoint, tmp_path, capfd):
    data = bytearray(crop_avi.read_bytes())
    starts = [i for i in range(len(data) - 3) if data[i:i + 3] == b"\xff\xd8\xff"]  # one JPEG per MJPG frame
    assert len(starts) == 20
    for k in (5, 6):
        data[starts[k]:starts[k] + 300] = bytes(300)  # frames 5 and 6 lose their JPEG headers
    damaged = tmp_path / "damaged.avi"
    damaged.write_bytes(bytes(data))
    assert main(["predict", str(damaged), "--model", str(checkpoint), "--out", str(tmp_path)]) == 1
    err = one_line(capfd).splitlines()
    assert err[0] == f"fervit: {damaged}: 2 unreadable frames skipped"
    video = json.loads((tmp_path / "damaged_emotions" / "damaged.json").read_text())
    assert [f["frame"] for f in video["frames"]] == [i for i in range(20) if i not in (5, 6)]
    assert video["unreadable_frames"] == 2 and video["classified_frames"] == 18


def test_no_camera_is_one_clear_line(checkpoint, capfd):
    assert main(["predict", "--webcam", "--model", str(checkpoint)]) == 2
    assert one_line(capfd) == ("fervit: error: no camera at --webcam 0: OpenCV could not open one (none is "
                               "connected, it is in use by another program, or this user may not access it); "
                               "predict a video file instead")


class FakeCamera:
    """A camera that gives the frames of a video, then (optionally) a Ctrl-C."""

    def __init__(self, path: Path, interrupt_after: int | None = None):
        self.capture, self.grabs, self.interrupt_after = cv2.VideoCapture(str(path)), 0, interrupt_after

    def grab(self):
        self.grabs += 1
        if self.interrupt_after is not None and self.grabs > self.interrupt_after:
            raise KeyboardInterrupt
        return self.capture.grab()

    def __getattr__(self, name):
        return getattr(self.capture, name)


def test_webcam_classifies_live_frames_until_max_frames(crop_avi, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fervit.inference.frames.open_camera", lambda index: FakeCamera(crop_avi))
    assert main(["predict", "--webcam", "--max-frames", "4", "--model", str(checkpoint),
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    live = [line for line in captured.out.splitlines() if re.match(r"\s*\d+\.\d\ds  ", line)]
    assert len(live) == 4 and all("#1 " in line for line in live)  # one line per frame, as it comes
    assert "Ctrl-C stops" in captured.err
    video = json.loads((tmp_path / "webcam0_emotions" / "webcam0.json").read_text())
    assert video["classified_frames"] == 4 and video["declared_frames"] == 0
    times = [f["time_s"] for f in video["frames"]]
    assert times == sorted(times)  # wall-clock stamps


def test_ctrl_c_ends_a_webcam_session_and_keeps_what_was_classified(crop_avi, checkpoint, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setattr("fervit.inference.frames.open_camera", lambda index: FakeCamera(crop_avi, 6))
    assert main(["predict", "--webcam", "2", "--model", str(checkpoint), "--out", str(tmp_path)]) == 0
    video = json.loads((tmp_path / "webcam2_emotions" / "webcam2.json").read_text())
    assert video["classified_frames"] == 6 and video["interrupted"] is True
    assert (tmp_path / "webcam2_emotions" / "webcam2_annotated.mp4").is_file()


@pytest.mark.parametrize("argv, words", [
    (["a.mp4", "b.jpg"], "give videos (a.mp4) and photos in separate commands"),
    (["a.mp4", "--every", "0"], "--every must be at least 1"),
    (["a.mp4", "--annotate", "x"], "--annotate is for photos"),
    (["b.jpg", "--every", "2"], "--every, --max-frames and --out are for videos"),
    (["a.mp4", "--webcam"], "--webcam reads the camera"),
    ([], "nothing to predict"),
])
def test_mixed_or_misplaced_video_options_are_one_clear_error(argv, words, checkpoint, capsys):
    assert main(["predict", *argv, "--model", str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fervit: error: ") and words in err and "\n" not in err


def test_tracker_follows_boxes_in_any_order_and_retires_a_face_gone_too_long():
    tracker = Tracker(max_gap=2)
    a, b = Box(10, 10, 50, 50), Box(200, 10, 50, 50)
    assert tracker.assign([a, b]) == [1, 2]
    assert tracker.assign([Box(214, 12, 50, 50), Box(4, 10, 50, 50)]) == [2, 1]  # listed the other way round
    assert tracker.assign([Box(231, 29, 50, 50)]) == [2]  # moved 17 px both ways: IoU 0.28, but its centre is near
    for _ in range(2):
        tracker.assign([])
    assert tracker.assign([a]) == [3]  # face 1 was gone for more than 2 frames: a new track
