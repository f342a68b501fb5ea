"""Shared fixtures: the real FER-2013 folder (read-only, beside the repo) and tiny synthetic layouts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "emotion_detection_fer"
CLASSES = ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own decode cache unless it sets one; the real data's cache is shared per session."""
    monkeypatch.setenv("FERVIT_CACHE", str(tmp_path_factory.getbasetemp() / "fervit-cache"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real FER-2013 data not found at {REAL_DATA}")
    return REAL_DATA


def make_layout(root: Path, per_class: int = 4, names=CLASSES, usages=("Training", "PublicTest", "PrivateTest"),
                ext: str = ".jpg", seed: int = 0) -> Path:
    """A tiny folder layout: train/<class>/Training_i.jpg and test/<class>/{PublicTest,PrivateTest}_i.jpg.

    Each class gets a distinct mean brightness so a model can learn it quickly."""
    rng = np.random.default_rng(seed)
    i = 0
    for split, split_usages in (("train", [u for u in usages if u == "Training"]),
                                ("test", [u for u in usages if u != "Training"])):
        for c, name in enumerate(names):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for usage in split_usages:
                for _ in range(per_class):
                    i += 1
                    base = 20 + c * 30
                    img = np.clip(rng.normal(base, 10, (48, 48)), 0, 255).astype(np.uint8)
                    Image.fromarray(img).save(d / f"{usage}_{i}{ext}")
    return root


@pytest.fixture
def tiny_layout(tmp_path) -> Path:
    return make_layout(tmp_path / "fer")


def pytest_configure(config):
    os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    """A test that needs one of its module's SLOW_FIXTURES is slow: the fixture's cost falls on whichever test
    runs first, so marking only the test that happened to pay it would leave the others slow when run alone."""
    for item in items:
        slow_fixtures = getattr(item.module, "SLOW_FIXTURES", ()) if hasattr(item, "module") else ()
        if set(item.fixturenames) & set(slow_fixtures):
            item.add_marker(pytest.mark.slow)
