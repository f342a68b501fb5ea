"""`fervit predict`: faces found in photos built from real FER-2013 faces, cropped like training, bad input per file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from photo import FACES, make_face_photo  # noqa: F401  (shared with other tests)

from fervit.cli import main
from fervit.data.dataset import CLASSES, decode_image
from fervit.inference.faces import Box, face_crop
from fervit.inference.predictor import Predictor, default_model
from helpers import save_tiny_checkpoint
# FER-2013 test faces that OpenCV's cascade finds when pasted onto a photo; placed at (x, y) with side s
def make_checkpoint(run_dir: Path, name: str = "vit_cnn", seed: int = 0) -> Path:
    """A small untrained model saved as a run folder would hold it (weights do not matter for these checks)."""
    save_tiny_checkpoint(run_dir, name, seed, patch_size=8)
    return run_dir


def iou(a: list[int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    return ix * iy / (aw * ah + bw * bh - ix * iy)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="module")
def photo(real_data, tmp_path_factory) -> Path:
    return make_face_photo(real_data, tmp_path_factory.mktemp("photos") / "three_faces.jpg")


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.load(checkpoint)


@pytest.fixture
def cv2():
    return pytest.importorskip("cv2", reason="face detection needs the detect extra (opencv-python-headless)")


def predict_json(capsys, *argv) -> tuple[int, list[dict]]:
    code = main(["predict", "--json", *map(str, argv)])
    return code, json.loads(capsys.readouterr().out)


def test_finds_every_real_face_on_a_photo_and_probabilities_sum_to_one(cv2, predictor, photo):
    [result] = predictor.predict_sources([(str(photo), photo)])
    assert result.error is None and not result.whole
    assert len(result.faces) == len(FACES)
    for face, (_, x, y, s) in zip(result.faces, FACES):  # boxes come sorted left to right, like FACES
        assert iou(face.box.as_list(), (x, y, s, s)) > 0.8
        assert list(face.probabilities) == list(CLASSES)
        assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert face.emotion in CLASSES


def test_a_detected_face_is_cropped_like_its_training_image(cv2, predictor, real_data, photo):
    _, crops, _ = predictor.find_faces(Image.open(photo))
    for crop, (rel, *_) in zip(crops, FACES):
        original = decode_image(real_data / "test" / rel).astype(float)
        # JPEG and the up/down rescale blur it a little (8-13 grey levels); a misframed crop is off by 25+
        assert np.abs(crop.astype(float) - original).mean() < 16
        assert np.corrcoef(crop.ravel(), original.ravel())[0, 1] > 0.85


def test_small_images_are_classified_whole_exactly_as_training_decodes_them(predictor, real_data):
    path = real_data / "test" / FACES[0][0]
    boxes, crops, whole = predictor.find_faces(Image.open(path))
    assert whole and boxes == [Box(0, 0, 48, 48)]
    np.testing.assert_array_equal(crops[0], decode_image(path))


def test_no_detect_converts_any_colour_image_like_training(predictor, tmp_path):
    path = tmp_path / "rgba.png"
    rgba = np.random.default_rng(1).integers(0, 256, (90, 130, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)
    _, crops, whole = predictor.find_faces(Image.open(path), detect="never")
    assert whole
    np.testing.assert_array_equal(crops[0], decode_image(path))


def test_crop_past_the_border_repeats_edge_pixels_instead_of_black(tmp_path):
    gray = Image.fromarray(np.full((100, 100), 200, np.uint8))
    crop = face_crop(gray, Box(-20, -20, 60, 60), margin=0.1)
    assert crop.min() == 200


def test_all_faces_of_a_batch_go_through_the_model_in_one_forward_pass(cv2, checkpoint, photo, real_data):
    calls = []
    p = Predictor.load(checkpoint)
    forward = p.classifier
    p.classifier = lambda x: calls.append(len(x)) or forward(x)
    small = real_data / "test" / FACES[1][0]
    results = list(p.predict_sources([("a", photo), ("b", small), ("c", photo)], batch_size=16))
    assert [len(r.faces) for r in results] == [3, 1, 3]
    assert calls == [7]


def test_json_reports_each_image_with_faces_or_an_error(cv2, capsys, checkpoint, photo, tmp_path):
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "cut.jpg").write_bytes(photo.read_bytes()[:4000])
    Image.new("RGB", (400, 300), (40, 160, 60)).save(tmp_path / "lawn.png")
    code, out = predict_json(capsys, photo, tmp_path / "notes.txt", tmp_path / "cut.jpg", tmp_path / "lawn.png",
                             tmp_path / "missing.jpg", "--model", checkpoint)
    assert code == 1  # some inputs failed
    by_name = {Path(r["file"]).name: r for r in out}
    assert len(by_name["three_faces.jpg"]["faces"]) == 3 and "error" not in by_name["three_faces.jpg"]
    face = by_name["three_faces.jpg"]["faces"][0]
    assert set(face) == {"box", "emotion", "probabilities"} and len(face["box"]) == 4
    assert "not an image" in by_name["notes.txt"]["error"]
    assert "damaged" in by_name["cut.jpg"]["error"]
    assert by_name["missing.jpg"]["error"] == "no such file"
    assert by_name["lawn.png"]["faces"] == [] and "error" not in by_name["lawn.png"]


def test_exit_status_is_zero_when_every_input_was_read(cv2, capsys, checkpoint, real_data, tmp_path):
    Image.new("RGB", (400, 300), (40, 160, 60)).save(tmp_path / "lawn.png")
    code, out = predict_json(capsys, tmp_path / "lawn.png", real_data / "test" / FACES[0][0], "--model", checkpoint)
    assert code == 0 and [len(r["faces"]) for r in out] == [0, 1]


def test_table_says_when_an_image_has_no_face_and_when_it_cannot_be_read(cv2, capsys, checkpoint, tmp_path):
    Image.new("RGB", (400, 300), (40, 160, 60)).save(tmp_path / "lawn.png")
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["predict", str(tmp_path / "lawn.png"), str(tmp_path / "notes.txt"), "--model", str(checkpoint)]) == 1
    captured = capsys.readouterr()
    lines = {Path(line.split()[0]).name: line for line in captured.out.splitlines()[1:]}
    assert "no face found" in lines["lawn.png"]
    assert "error: not an image" in lines["notes.txt"]
    assert "1 of 2 input(s) could not be read" in captured.err


def test_csv_has_a_row_per_face_with_every_class_probability(cv2, capsys, checkpoint, photo):
    assert main(["predict", "--csv", str(photo), "--model", str(checkpoint)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "file,face,x,y,w,h,emotion," + ",".join(CLASSES) + ",error"
    assert len(lines) == 1 + len(FACES)
    probs = [float(v) for v in lines[1].split(",")[7:14]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)


def test_folders_are_read_recursively_and_hidden_files_skipped(capsys, checkpoint, real_data, tmp_path):
    nested = tmp_path / "faces" / "more"
    nested.mkdir(parents=True)
    (tmp_path / "faces" / "a.jpg").write_bytes((real_data / "test" / FACES[0][0]).read_bytes())
    (nested / "b.jpg").write_bytes((real_data / "test" / FACES[1][0]).read_bytes())
    (tmp_path / "faces" / ".DS_Store").write_bytes(b"\0\0")
    code, out = predict_json(capsys, tmp_path / "faces", "--model", checkpoint)
    assert code == 0
    assert sorted(Path(r["file"]).name for r in out) == ["a.jpg", "b.jpg"]


def test_stdin_dash_reads_one_image(capsys, monkeypatch, checkpoint, real_data):
    data = (real_data / "test" / FACES[0][0]).read_bytes()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out = predict_json(capsys, "-", "--model", checkpoint)
    assert code == 0 and out[0]["file"] == "-" and len(out[0]["faces"]) == 1


def test_annotate_writes_a_copy_with_the_boxes_drawn(cv2, capsys, checkpoint, photo, tmp_path):
    out_dir = tmp_path / "annotated"
    assert main(["predict", str(photo), "--model", str(checkpoint), "--annotate", str(out_dir)]) == 0
    copy = Image.open(out_dir / "three_faces.jpg")
    assert copy.size == Image.open(photo).size
    diff = np.abs(np.asarray(copy, dtype=int) - np.asarray(Image.open(photo), dtype=int)).sum(-1)
    _, x, y, s = FACES[0]
    assert diff[y:y + s, x - 3:x + 3].mean() > 60  # the left edge of the first box is drawn


def test_default_model_is_the_newest_run(monkeypatch, tmp_path):
    import os

    monkeypatch.setattr("fervit.inference.predictor.shipped_model", lambda: None)  # as in a build without one

    older = make_checkpoint(tmp_path / "runs" / "a") / "best_model.safetensors"
    newer = make_checkpoint(tmp_path / "runs" / "b") / "best_model.safetensors"
    os.utime(older, (1e9, 1e9))
    monkeypatch.chdir(tmp_path)
    assert default_model().resolve() == newer.resolve()


def test_no_model_anywhere_is_one_clear_error(capsys, monkeypatch, tmp_path, real_data):
    monkeypatch.setattr("fervit.inference.predictor.shipped_model", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(real_data / "test" / FACES[0][0])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fervit: error: no model to use") and "\n" not in err


def test_checkpoint_from_another_model_is_one_clear_error(capsys, tmp_path, real_data):
    run = make_checkpoint(tmp_path / "patch", name="vit_patch")
    cnn = make_checkpoint(tmp_path / "cnn")
    (run / "best_model.json").write_text((cnn / "best_model.json").read_text())  # weights of one, description of other
    assert main(["predict", str(real_data / "test" / FACES[0][0]), "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not match a vit_cnn model" in err and "\n" not in err


def test_damaged_checkpoint_is_one_clear_error(capsys, tmp_path, real_data):
    run = make_checkpoint(tmp_path / "run")
    weights = run / "best_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    assert main(["predict", str(real_data / "test" / FACES[0][0]), "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "damaged" in err and "\n" not in err


def test_onnx_backend_without_an_export_says_how_to_make_one(capsys, checkpoint, real_data):
    assert main(["predict", str(real_data / "test" / FACES[0][0]), "--model", str(checkpoint),
                 "--backend", "onnx"]) == 2
    assert "run `fervit export" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["the input folder", "the input file's folder"])
def test_annotate_into_a_folder_of_inputs_is_refused_before_anything_is_written(capsys, checkpoint, real_data,
                                                                                 tmp_path, where):
    # issue 21: `predict photos/ --annotate photos/` replaced every input photo with its annotated copy
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, *_ in FACES[:2]:
        (photos / Path(name).name).write_bytes((real_data / "test" / name).read_bytes())
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    target = str(photos) if where == "the input folder" else str(photos / Path(FACES[0][0]).name)
    assert main(["predict", target, "--model", str(checkpoint), "--annotate", str(photos) + "/"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--annotate folder '{photos}' holds input photos" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_annotate_never_replaces_a_file_already_in_the_folder(capsys, checkpoint, real_data, tmp_path):
    face = real_data / "test" / FACES[0][0]
    out_dir = tmp_path / "annotated"
    out_dir.mkdir()
    (out_dir / face.name).write_bytes(b"someone's file")
    assert main(["predict", str(face), "--model", str(checkpoint), "--annotate", str(out_dir)]) == 0
    assert (out_dir / face.name).read_bytes() == b"someone's file"
    copy = out_dir / f"{face.stem}_2{face.suffix}"
    assert Image.open(copy).size == Image.open(face).size
