"""Reading FER-2013: layouts, spellings, the CSV, the cache, and every kind of bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fervit.data.dataset import CLASSES, CSV_LABELS, class_index, load_fer
from fervit.errors import FervitError
from tests.conftest import make_layout


def test_folder_layout_reads_every_image_with_its_class_and_usage(tiny_layout, tmp_path):
    data = load_fer(tiny_layout, tmp_path / "cache", progress=False)
    assert data.images.shape == (7 * 4 * 3, 48, 48) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels).tolist() == [12] * 7
    assert int((data.folder == 0).sum()) == 28 and int((data.folder == 1).sum()) == 56
    assert sorted(set(data.usage.tolist())) == [1, 2, 3]


@pytest.mark.parametrize("names", [
    ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"),  # the Kaggle "FER-2013" release
    ("ANGRY", "Disgusted", "FEARFUL", "Happy", "neutral", "SAD", "Surprised"),
])
def test_class_folder_spellings_map_to_the_same_labels(tmp_path, names):
    root = make_layout(tmp_path / "fer", per_class=1, names=names, ext=".png")
    data = load_fer(root, tmp_path / "cache", progress=False)
    for path, label in zip(data.paths, data.labels.tolist()):
        assert class_index(path.split("/")[1]) == label
    assert sorted(set(data.labels.tolist())) == list(range(7))


def test_class_index_accepts_aliases_and_rejects_others():
    assert class_index("Disgust") == CLASSES.index("disgusted")
    assert class_index("surprise") == CLASSES.index("surprised")
    assert class_index("contempt") is None


def test_csv_maps_fer2013_label_order_and_usage(tmp_path):
    rows = ["emotion,pixels,Usage"]
    for emotion in range(7):
        pixels = " ".join([str(emotion * 10)] * 2304)
        rows.append(f"{emotion},{pixels},{['Training', 'PublicTest', 'PrivateTest'][emotion % 3]}")
    rows.append("3,1 2 3,Training")  # truncated pixels: skipped and counted
    (tmp_path / "fer2013.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="skipped 1"):
        data = load_fer(tmp_path, tmp_path / "cache", progress=False)
    assert len(data) == 7
    for emotion in range(7):
        assert int(data.labels[emotion]) == CSV_LABELS[emotion]
        assert int(data.images[emotion, 0, 0]) == emotion * 10
    assert CLASSES[CSV_LABELS[6]] == "neutral" and CLASSES[CSV_LABELS[4]] == "sad"
    assert data.usage.tolist()[:3] == [1, 2, 3]


def test_cache_is_reused_and_outside_the_data_folder(tiny_layout, tmp_path, monkeypatch):
    import fervit.data.dataset as dataset

    cache = tmp_path / "cache"
    first = load_fer(tiny_layout, cache, progress=False)
    assert list(cache.glob("*.safetensors")) and not list(tiny_layout.rglob("*.safetensors"))

    def no_decoding(source):
        raise AssertionError(f"decoded {source} although the cache holds it")

    monkeypatch.setattr(dataset, "decode_image", no_decoding)
    second = load_fer(tiny_layout, cache, progress=False)
    assert torch.equal(first.images, second.images) and first.paths == second.paths


def test_cache_is_invalidated_when_the_file_list_changes(tiny_layout, tmp_path):
    cache = tmp_path / "cache"
    n = len(load_fer(tiny_layout, cache, progress=False))
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tiny_layout / "train" / "happy" / "Training_99999.jpg")
    assert len(load_fer(tiny_layout, cache, progress=False)) == n + 1


def test_real_data_loads_with_the_documented_counts(real_data, tmp_path_factory):
    data = load_fer(real_data, progress=False)
    assert len(data) == 35887
    train_counts = torch.bincount(data.labels[data.folder == 0], minlength=7).tolist()
    assert train_counts == [3995, 436, 4097, 7215, 4965, 4830, 3171]
    assert data.skipped == 0


def test_missing_root_is_one_sentence_naming_the_layout(tmp_path):
    with pytest.raises(FervitError, match="does not exist.*ROOT/train/<class>"):
        load_fer(tmp_path / "nope", tmp_path / "cache")


def test_empty_root_says_no_train_or_test_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FervitError, match="no train/ or test/ folder"):
        load_fer(tmp_path / "empty", tmp_path / "cache")


def test_train_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "fer" / "train" / "happy").mkdir(parents=True)
    with pytest.raises(FervitError, match="no images found"):
        load_fer(tmp_path / "fer", tmp_path / "cache")


def test_unknown_class_folder_lists_the_known_names(tiny_layout, tmp_path):
    (tiny_layout / "train" / "contempt").mkdir()
    with pytest.raises(FervitError, match="unknown class folder 'train/contempt'.*angry, disgusted"):
        load_fer(tiny_layout, tmp_path / "cache")


def _add_bad_files(root):
    happy = root / "train" / "happy"
    (happy / "Training_1000001.jpg").write_bytes(b"not an image at all")
    good = (root / "train" / "sad").glob("*.jpg").__next__().read_bytes()
    (happy / "Training_1000002.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (happy / "notes.txt").write_text("a stray file")


def test_corrupt_truncated_and_non_image_files_are_skipped_and_counted(tiny_layout, tmp_path):
    n = len(load_fer(tiny_layout, tmp_path / "c1", progress=False))
    _add_bad_files(tiny_layout)
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable or non-image file\(s\)"):
        data = load_fer(tiny_layout, tmp_path / "c2", progress=False)
    assert len(data) == n and data.skipped == 3
    with pytest.warns(UserWarning, match="skipped 3"):  # the cached load says it too
        load_fer(tiny_layout, tmp_path / "c2", progress=False)


def test_strict_makes_corrupt_files_fatal(tiny_layout, tmp_path):
    _add_bad_files(tiny_layout)
    with pytest.raises(FervitError, match="skipped 3.*strict"):
        load_fer(tiny_layout, tmp_path / "cache", strict=True, progress=False)


def test_colour_and_other_sized_images_become_48x48_grayscale(tmp_path):
    root = make_layout(tmp_path / "fer", per_class=1)
    Image.new("RGB", (200, 120), (255, 0, 0)).save(root / "train" / "happy" / "Training_5001.png")
    Image.new("RGBA", (64, 64), (0, 0, 255, 128)).save(root / "train" / "happy" / "Training_5002.png")
    Image.new("P", (30, 30)).save(root / "train" / "happy" / "Training_5003.bmp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_fer(root, tmp_path / "cache", progress=False)
    i = data.paths.index("train/happy/Training_5001.png")
    assert data.images.shape[1:] == (48, 48)
    assert int(data.images[i, 24, 24]) == 76  # PIL's L conversion of pure red: 0.299 * 255
