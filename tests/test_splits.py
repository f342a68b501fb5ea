"""The two protocols: sizes, stratification, no overlap, determinism, and duplicate dropping."""

from __future__ import annotations

import pytest
import torch

from fervit.data.dataset import load_fer
from fervit.data.splits import make_splits
from fervit.errors import FervitError
from tests.conftest import make_layout


def _no_overlap(s):
    sets = [set(s.train.tolist()), set(s.val.tolist()), set(s.test.tolist())]
    return not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_real_data_seed_protocol_is_a_stratified_90_10_split_of_train(real_data):
    data = load_fer(real_data, progress=False)
    s = make_splits(data, "seed", 0.1, seed=0)
    assert len(s.train) + len(s.val) == 28709 and len(s.test) == 7178
    assert abs(len(s.val) - 2871) <= 7  # rounding per class
    assert _no_overlap(s)
    val_share = torch.bincount(data.labels[s.val], minlength=7) / torch.bincount(data.labels[data.folder == 0])
    assert torch.allclose(val_share, torch.full((7,), 0.1), atol=0.002)


def test_real_data_fer2013_protocol_uses_the_usage_in_file_names(real_data):
    data = load_fer(real_data, progress=False)
    s = make_splits(data, "fer2013")
    assert s.sizes() == {"train": 28709, "val": 3589, "test": 3589}
    assert _no_overlap(s)
    assert all("PrivateTest_" in data.paths[i] for i in s.test[:50].tolist())


def test_seed_split_is_deterministic_and_changes_with_the_seed(tiny_layout):
    data = load_fer(tiny_layout, progress=False)
    a, b, c = (make_splits(data, "seed", 0.25, seed=k) for k in (0, 0, 1))
    assert torch.equal(a.val, b.val) and not torch.equal(a.val, c.val)
    assert _no_overlap(a)


def test_fer2013_protocol_without_usage_names_is_a_clear_error(tmp_path):
    root = make_layout(tmp_path / "fer", per_class=1)
    for p in list(root.rglob("*.jpg")):
        p.rename(p.with_name("im" + p.name.split("_")[1]))
    data = load_fer(root, progress=False)
    with pytest.raises(FervitError, match="fer2013 protocol needs.*use --protocol seed"):
        make_splits(data, "fer2013")


def test_unknown_protocol_is_an_error(tiny_layout):
    with pytest.raises(FervitError, match="unknown protocol 'kfold'"):
        make_splits(load_fer(tiny_layout, progress=False), "kfold")


def test_drop_eval_duplicates_removes_training_copies_of_eval_images(tiny_layout):
    data = load_fer(tiny_layout, progress=False)
    s = make_splits(data, "fer2013")
    data.images[s.train[:3]] = data.images[s.test[:3]]  # plant three copies
    dropped = make_splits(data, "fer2013", drop_eval_duplicates=True)
    assert len(dropped.train) == len(s.train) - 3
    assert not set(dropped.train.tolist()) & set(s.train[:3].tolist())
