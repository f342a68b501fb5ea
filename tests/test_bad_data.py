"""Hostile and odd datasets: unreadable folders, broken links, damaged CSVs, a tampered decode cache.

Each ends in a warning that names the problem, a counted skip, or one clear line, never in silently
wrong data or a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fervit.cli import main
from fervit.data.dataset import CLASSES, USAGES, load_fer
from fervit.errors import FervitError
from conftest import make_layout

PIXELS = " ".join(["128"] * 48 * 48)


def write_csv(path: Path, rows, header: str = "emotion,pixels,Usage", encoding: str = "utf-8") -> Path:
    path.write_text(header + "\n" + "".join(f"{r}\n" for r in rows), encoding=encoding)
    return path


def deny(monkeypatch, folder: Path) -> None:
    """Make `folder` unreadable the way chmod 000 would for a normal user (the tests may run as root)."""
    real_scandir, real_iterdir = os.scandir, Path.iterdir

    def scandir(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def iterdir(self):
        if self == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(Path, "iterdir", iterdir)


def test_an_unreadable_class_folder_is_named_in_a_warning(monkeypatch, tiny_layout):
    deny(monkeypatch, tiny_layout / "train" / "sad")
    with pytest.warns(UserWarning, match=r"cannot read 1 folder\(s\) .*'train/sad' \(Permission denied\)"):
        data = load_fer(tiny_layout, progress=False)
    assert CLASSES.index("sad") not in data.labels[data.folder == 0].tolist()


def test_an_unreadable_class_folder_is_fatal_under_strict(monkeypatch, tiny_layout):
    deny(monkeypatch, tiny_layout / "train" / "sad")
    with pytest.raises(FervitError, match="'train/sad' .*data.strict is on"):
        load_fer(tiny_layout, strict=True, progress=False)


def test_an_unreadable_test_folder_is_one_line(monkeypatch, capsys, tiny_layout):
    deny(monkeypatch, tiny_layout / "test")
    assert main(["data", "audit", str(tiny_layout)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fervit: error: cannot read the folder") and "(Permission denied)" in err
    assert len(err.strip().splitlines()) == 1


def test_audit_counts_dangling_links_and_link_loops_as_named_skips(capsys, tiny_layout):
    (tiny_layout / "train" / "happy" / "gone.jpg").symlink_to(tiny_layout / "nowhere.jpg")
    (tiny_layout / "train" / "happy" / "loop.jpg").symlink_to(tiny_layout / "train" / "happy" / "loop.jpg")
    with pytest.warns(UserWarning) as record:
        assert main(["data", "audit", str(tiny_layout)]) == 0
    assert "skipped 2 unreadable or non-image file(s), e.g. train/happy/gone.jpg (broken symbolic link), " \
           "train/happy/loop.jpg (symbolic link loop)" in [str(w.message) for w in record]


@pytest.mark.parametrize("target", ["deleted", "fer"], ids=["dangling", "loop"])
def test_a_dangling_or_looping_link_as_the_data_root_is_one_line(capsys, tmp_path, target):
    (tmp_path / "fer").symlink_to(tmp_path / target)
    assert main(["data", "audit", str(tmp_path / "fer")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fervit: error: data root '{tmp_path / 'fer'}' is a broken or looping symbolic link;")


def test_the_skip_warning_never_ends_in_an_empty_example_list(tiny_layout):
    (tiny_layout / "train" / "notes.txt").write_text("a stray file beside the class folders")
    with pytest.warns(UserWarning) as record:
        load_fer(tiny_layout, progress=False)
    [message] = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert message == "skipped 1 unreadable or non-image file(s), e.g. train/notes.txt (not a class folder)"


def test_an_eps_file_named_jpg_is_a_counted_skip_in_training(tiny_layout):
    (tiny_layout / "train" / "happy" / "poster.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 48\n")
    with pytest.warns(UserWarning, match=r"skipped 1 .*train/happy/poster.jpg"):
        data = load_fer(tiny_layout, progress=False)
    assert "train/happy/poster.jpg" not in data.paths


@pytest.mark.parametrize("emotion", ["-1", "7"])
def test_an_emotion_outside_0_to_6_is_a_counted_skip(tmp_path, emotion):
    path = write_csv(tmp_path / "fer2013.csv", [f"3,{PIXELS},Training", f"{emotion},{PIXELS},Training"])
    with pytest.warns(UserWarning, match=r"skipped 1 .*fer2013.csv:3"):
        data = load_fer(path, progress=False)
    assert data.labels.tolist() == [CLASSES.index("happy")]


def test_an_emotion_outside_0_to_6_is_fatal_under_strict(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [f"3,{PIXELS},Training", f"-1,{PIXELS},Training"])
    with pytest.raises(FervitError, match="skipped 1 .*fer2013.csv:3 .*data.strict is on"):
        load_fer(path, strict=True, progress=False)


def test_usage_values_are_matched_ignoring_case_and_spaces(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [f"3,{PIXELS}, training", f"3,{PIXELS},Public Test",
                                                f"3,{PIXELS},privatetest", f"3,{PIXELS},"])
    data = load_fer(path, progress=False)
    assert [USAGES[u] for u in data.usage.tolist()] == ["Training", "PublicTest", "PrivateTest", ""]


def test_an_unknown_usage_value_is_an_error_naming_it(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [f"3,{PIXELS},Training", f"3,{PIXELS},PrivateTset"])
    with pytest.raises(FervitError, match=r"line 3: unknown Usage 'PrivateTset'; expected one of Training, "
                                          r"PublicTest, PrivateTest"):
        load_fer(path, progress=False)


def test_a_csv_with_a_utf8_byte_order_mark_is_read(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [f"3,{PIXELS},Training"], encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_fer(path, progress=False).labels.tolist() == [CLASSES.index("happy")]


@pytest.mark.parametrize("content, message", [
    (b"emotion,pixels,Usage\n3,\x00\x01\x02\xff\xfe,Training\n", "is not UTF-8 text"),
    ("emotion,pixels,Usage\n3,caf\u00e9,Training\n".encode("latin-1"), "is not UTF-8 text"),
    (b"emotion,pixels,Usage\n3,\"" + b"1 " * 70_000 + b"\",Training\n", "field larger than field limit"),
], ids=["binary", "latin-1", "huge-field"])
def test_audit_of_an_unreadable_csv_is_one_line(capsys, tmp_path, content, message):
    (tmp_path / "fer2013.csv").write_bytes(content)
    assert main(["data", "audit", str(tmp_path / "fer2013.csv")]) == 2
    err = capsys.readouterr().err.split("\r")[-1]  # after the progress bar
    assert err.startswith("fervit: error: ") and message in err and len(err.strip().splitlines()) == 1


def cache_files(cache: Path) -> tuple[Path, Path]:
    [tensors] = cache.glob("fer-*.safetensors")
    return tensors, tensors.with_suffix(".json")


def test_a_cache_with_a_flipped_byte_is_rebuilt_with_a_note(tmp_path):
    root, cache = make_layout(tmp_path / "fer", per_class=2), tmp_path / "cache"
    first = load_fer(root, cache, progress=False)
    tensors, _ = cache_files(cache)
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 0xFF  # the last pixel of the last image
    tensors.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="does not match its checksum .*rebuilding it"):
        again = load_fer(root, cache, progress=False)
    assert torch.equal(again.images, first.images)


def test_another_datasets_cache_under_the_same_name_is_rebuilt(tmp_path):
    root, other, cache = make_layout(tmp_path / "fer", 2), make_layout(tmp_path / "other", 3, seed=1), tmp_path / "c"
    expected = load_fer(root, cache, progress=False)
    mine = cache_files(cache)
    for path in mine:
        path.rename(path.with_name("mine-" + path.name))
    load_fer(other, cache, progress=False)
    theirs = cache_files(cache)
    for src, dst in zip(theirs, mine):  # the other dataset's cache, renamed to this dataset's key
        src.rename(dst)
    with pytest.warns(UserWarning, match="was written for another file list; rebuilding it"):
        data = load_fer(root, cache, progress=False)
    assert len(data) == len(expected) and data.paths == expected.paths
    assert np.array_equal(data.images.numpy(), expected.images.numpy())


# issue 21: the decode cache's checksum covered its tensors but not its JSON
@pytest.mark.parametrize("edit", ["paths", "skipped", "skip_examples", "no checksum"])
def test_a_cache_whose_file_list_was_edited_is_rebuilt_with_a_note(tmp_path, edit):
    import json

    root, cache = make_layout(tmp_path / "fer", per_class=2), tmp_path / "cache"
    first = load_fer(root, cache, progress=False)
    _, meta_path = cache_files(cache)
    meta = json.loads(meta_path.read_text())
    if edit == "paths":
        meta["paths"][0], meta["paths"][-1] = meta["paths"][-1], meta["paths"][0]
    elif edit == "skipped":
        meta["skipped"] = 1000
    elif edit == "skip_examples":
        meta["skip_examples"] = ["train/happy/evil.jpg"]
    else:
        del meta["listing_sha256"]
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="(does not match its checksum|has no checksum of its file list).*rebuilding it"):
        again = load_fer(root, cache, progress=False)
    assert again.paths == first.paths and again.skipped == first.skipped == 0
    assert torch.equal(again.images, first.images)


@pytest.mark.parametrize("link, says", [
    ("train/happy -> .", "holds the train/ folder"),
    ("train/happy -> ..", "holds the whole dataset"),
    ("train/happy -> sad", "share images"),
    ("test/happy -> ../train/happy", "share images"),
], ids=["its-parent", "the-root", "another-class", "a-training-class-as-test"])
def test_a_class_folder_that_links_to_images_read_elsewhere_is_one_line(tmp_path, capsys, link, says):
    # issue 21: `train/happy -> .` read every training image again as "happy", without a word
    import shutil

    root = make_layout(tmp_path / "fer", per_class=2)
    name, target = link.split(" -> ")
    shutil.rmtree(root / name)
    (root / name).symlink_to(target, target_is_directory=True)
    with pytest.raises(FervitError, match=says) as error:
        load_fer(root, tmp_path / "cache", progress=False)
    assert f"'{name}'" in str(error.value) and "\n" not in str(error.value)
    assert main(["data", "audit", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fervit: error: ") and says in err and "\n" not in err
