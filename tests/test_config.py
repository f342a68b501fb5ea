"""The config tree: presets, overrides, round trips and their errors."""

from __future__ import annotations

import json
import re

import pytest

from fervit.config import AugmentConfig, ModelConfig, RunConfig, apply_overrides, from_dict, load_preset, preset_names
from fervit.errors import FervitError


def test_shipped_presets_cover_both_models_and_the_original():
    assert {"vit_cnn", "vit_patch", "original", "tiny"} <= set(preset_names())
    assert load_preset("vit_patch").model.name == "vit_patch"
    assert load_preset("original").model.dropout == 0.2


def test_config_round_trips_through_json():
    cfg = apply_overrides(load_preset("vit_cnn"), ["model.stem_channels=16,32,64", "optim.lr=1e-3"])
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.model.stem_channels == (16, 32, 64)


def test_overrides_are_typed():
    cfg = apply_overrides(RunConfig(), ["model.depth=4", "augment.enabled=false", "augment.scale=0.5,1.0"])
    assert cfg.model.depth == 4 and cfg.augment.enabled is False and cfg.augment.scale == (0.5, 1.0)


@pytest.mark.parametrize("override,message", [
    ("model.depth", "must look like section.key=value"),
    ("depth=4", "must name a section and a key"),
    ("modle.depth=4", "unknown config section 'modle'"),
    ("model.deepth=4", "unknown config key 'model.deepth'"),
    ("model.depth=four", "expects a int"),
    ("augment.enabled=maybe", "expects a bool"),
])
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(FervitError, match=message):
        apply_overrides(RunConfig(), [override])


def test_preset_files_and_unknown_names(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"model": {"depth": 3}}')
    assert load_preset(str(path)).model.depth == 3
    with pytest.raises(FervitError, match="no preset 'vit_huge'"):
        load_preset("vit_huge")
    path.write_text('{"model": {"depht": 3}}')
    with pytest.raises(FervitError, match="unknown config key 'model.depht'"):
        load_preset(str(path))


@pytest.mark.parametrize("override,message", [
    ("data.protocol=kaggle", "'data.protocol' must be one of seed, fer2013, got 'kaggle'"),
    ("model.pool=max", "'model.pool' must be one of cls, mean"),
    ("optim.sampler=weighted", "'optim.sampler' must be one of uniform, balanced"),
    ("optim.class_weights=inverse", "'optim.class_weights' must be one of none, balanced"),
    ("train.compile=yes", "'train.compile' must be one of auto, on, off"),
    ("train.amp=fp16", "'train.amp' must be one of auto, bf16, off"),
    ("train.device=gpu", "'train.device' must be auto, cpu, mps, cuda or cuda:N"),
    ("train.device=cuda:x", "'train.device' must be auto, cpu, mps, cuda or cuda:N"),
])
def test_string_options_are_checked_when_the_config_is_built(override, message):
    with pytest.raises(FervitError, match=message):
        apply_overrides(RunConfig(), [override])
    section, rest = override.split(".", 1)
    key, value = rest.split("=")
    with pytest.raises(FervitError, match=message):
        RunConfig.from_dict({section: {key: value}})


def test_a_config_section_is_built_from_json_by_the_public_from_dict():
    model = from_dict(ModelConfig, {"name": "vit_patch", "stem_channels": [8, 16]}, "model.")
    assert model == ModelConfig(name="vit_patch", stem_channels=(8, 16))
    assert apply_overrides(RunConfig(), ["train.device=cuda:1"]).train.device == "cuda:1"


def test_augment_strength_scales_every_amount_and_keeps_probabilities_valid():
    base = AugmentConfig()
    assert base.scaled(1.0) == base
    none = base.scaled(0.0)
    assert (none.rotation, none.translate, none.brightness, none.contrast, none.erase_p) == (0, 0, 0, 0, 0)
    assert none.scale == (1.0, 1.0) and none.hflip == base.hflip  # flips are not an amount
    strong = base.scaled(10.0)
    assert strong.erase_p == 1.0 and strong.scale == (0.05, 1.0)


@pytest.mark.parametrize("override, says", [
    ("optim.ema_decay=1.5", "0 (off) or in (0, 1)"), ("optim.ema_decay=-0.5", "0 (off) or in (0, 1)"),
    ("optim.momentum=-1", "in [0, 1)"), ("optim.plateau_factor=2", "a drop of the lr"),
    ("optim.plateau_factor=0", "a drop of the lr"), ("optim.plateau_patience=-3", "at least 1"),
    ("optim.lr=0", "above 0"), ("train.epochs=0", "at least 1"), ("augment.hflip=1.5", "a probability"),
])
def test_a_number_outside_what_its_key_can_mean_is_one_line_when_the_config_is_built(override, says):
    with pytest.raises(FervitError, match=re.escape(f"config key '{override.split('=')[0]}' must be")) as error:
        apply_overrides(RunConfig(), [override])
    assert says in str(error.value)
    key, value = override.split("=")
    section, name = key.split(".")
    with pytest.raises(FervitError, match="must be"):
        RunConfig.from_dict({section: {name: float(value)}})
