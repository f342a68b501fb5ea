"""One rule for where the data is, the same for every command and script (README "Data"): --data, $FERVIT_DATA,
./data/emotion_detection_fer, ../shared/data/emotion_detection_fer, then where `fervit data fetch` puts it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_layout

from fervit.data.location import fetch_folder, resolve_data_root
from fervit.errors import FervitError


@pytest.fixture
def clone(tmp_path, monkeypatch):
    """A working directory `work/clone` with nothing around it, and a private user data folder."""
    monkeypatch.delenv("FERVIT_DATA", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    here = tmp_path / "work" / "clone"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    return here


def test_without_any_data_the_error_names_every_place_it_looked(clone):
    with pytest.raises(FervitError) as e:
        resolve_data_root("")
    msg = str(e.value)
    assert "\n" not in msg and "FERVIT_DATA" in msg and "fervit data fetch" in msg
    for place in (clone / "data" / "emotion_detection_fer", clone / ".." / "shared" / "data" / "emotion_detection_fer",
                  fetch_folder()):
        assert str(place) in msg


def test_the_places_are_tried_in_order_and_the_first_found_is_absolute(clone, monkeypatch):
    fetched = fetch_folder()
    fetched.mkdir(parents=True)
    assert resolve_data_root("") == str(fetched)
    beside = clone.parent / "shared" / "data" / "emotion_detection_fer"
    beside.mkdir(parents=True)
    assert Path(resolve_data_root("")).resolve() == beside.resolve()
    inside = clone / "data" / "emotion_detection_fer"
    inside.mkdir(parents=True)
    assert resolve_data_root("") == str(inside)
    monkeypatch.setenv("FERVIT_DATA", str(fetched))
    assert resolve_data_root("") == str(fetched)  # the variable beats every default place
    assert resolve_data_root("elsewhere") == "elsewhere"  # and --data beats the variable


def test_a_fervit_data_that_does_not_exist_is_named(clone, monkeypatch):
    monkeypatch.setenv("FERVIT_DATA", "/no/such/fer")
    with pytest.raises(FervitError, match=r"\$FERVIT_DATA names '/no/such/fer', which does not exist"):
        resolve_data_root("")


def test_fetch_puts_the_data_where_the_commands_look(clone, monkeypatch, tmp_path):
    import types

    src = tmp_path / "kaggle"
    for split in ("train", "test"):
        (src / split / "happy").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=lambda h: str(src)))
    from fervit.cli import main

    assert main(["data", "fetch"]) == 0
    assert (fetch_folder() / "train" / "happy").is_dir()
    assert resolve_data_root("") == str(fetch_folder())


@pytest.mark.slow
@pytest.mark.e2e
def test_every_command_finds_the_data_beside_the_clone(tmp_path):
    """What train.sh found, the commands run directly find too: here `data audit` and `evaluate`."""
    from helpers import save_tiny_checkpoint

    make_layout(tmp_path / "shared" / "data" / "emotion_detection_fer", per_class=2)
    clone = tmp_path / "clone"
    run = save_tiny_checkpoint(clone / "runs" / "r").parent
    env = {k: v for k, v in os.environ.items() if k != "FERVIT_DATA"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    for args in (["data", "audit"], ["evaluate", str(run.relative_to(clone)), "--device", "cpu"]):
        done = subprocess.run([sys.executable, "-m", "fervit", *args], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
