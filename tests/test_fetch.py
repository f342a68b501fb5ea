"""`fervit data fetch` without kagglehub, credentials or network says what to do in one sentence."""

from __future__ import annotations

import sys
import types

import pytest

from fervit.data.fetch import fetch
from fervit.errors import FervitError


def test_without_kagglehub_it_names_the_extra_and_the_manual_route(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import fails as if not installed
    with pytest.raises(FervitError, match=r"pip install 'fervit\[fetch\]'.*by hand"):
        fetch(tmp_path)


def test_offline_or_without_credentials_it_says_how_to_fix_it(monkeypatch, tmp_path):
    def refuse(handle):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=refuse))
    with pytest.raises(FervitError, match="could not download from Kaggle.*credentials.*by hand") as e:
        fetch(tmp_path)
    assert "\n" not in str(e.value)


def test_a_download_is_copied_into_the_destination(monkeypatch, tmp_path):
    src = tmp_path / "kaggle" / "versions" / "1"
    for split in ("train", "test"):
        (src / split / "happy").mkdir(parents=True)
        (src / split / "happy" / "x.jpg").write_bytes(b"jpg")
    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=lambda h: str(src)))
    assert "fervit train --data" in fetch(tmp_path / "dest")
    assert (tmp_path / "dest" / "test" / "happy" / "x.jpg").is_file()
