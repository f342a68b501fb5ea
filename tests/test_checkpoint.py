"""The model file's JSON description (`ModelFile`): one typed object, written and read in one place,
and every file written so far still reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import save_tiny_checkpoint, tiny_model_config

from fervit.config import DataConfig
from fervit.errors import FervitError
from fervit.model_file import InputSpec, ModelFile, SplitSpec
from fervit.models.checkpoint import describe

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "fervit" / "assets" / "model.json"


def test_a_description_round_trips_through_json():
    meta = describe(tiny_model_config(), DataConfig(protocol="fer2013", drop_eval_duplicates=True), epoch=3,
                    val_acc=0.5)
    again = ModelFile.from_dict(json.loads(json.dumps(meta.to_dict())), "test")
    assert again == meta and again.split == SplitSpec("fer2013", 0.1, 0, True)
    assert again.input == InputSpec(size=48, channels=1, mean=0.5, std=0.5)


def test_the_shipped_fervit_model_1_file_reads_with_its_split_and_provenance():
    meta = ModelFile.from_dict(json.loads(SHIPPED.read_text()), SHIPPED)
    assert meta.split.protocol == "fer2013" and meta.source_run
    assert meta.dtype == "float16" and meta.metrics["test_accuracy"] > 0 and meta.epoch > 0


def test_a_first_generation_file_with_only_a_protocol_gives_that_split(tmp_path):
    weights = save_tiny_checkpoint(tmp_path)
    d = json.loads(weights.with_suffix(".json").read_text())
    d.pop("split", None)
    d["protocol"] = "fer2013"
    assert ModelFile.from_dict(d, "old").split.data_config() == DataConfig(protocol="fer2013")


def test_a_description_of_another_format_or_with_damaged_fields_is_one_clear_error():
    with pytest.raises(FervitError, match="not a fervit model description"):
        ModelFile.from_dict({"format": "fervit-model/9"}, "x.json")
    d = describe(tiny_model_config()).to_dict()
    d["input"] = {"size": 48, "colour": "yes"}
    with pytest.raises(FervitError, match="'x.json' is a damaged model description"):
        ModelFile.from_dict(d, "x.json")


def test_evaluate_feeds_the_model_the_normalisation_its_file_records(tiny_layout, tmp_path):
    from fervit.evaluation.rerun import evaluate_checkpoint

    weights = save_tiny_checkpoint(tmp_path / "run")
    losses = []
    for std in (0.5, 0.25):
        meta = json.loads(weights.with_suffix(".json").read_text())
        meta["input"]["std"] = std
        weights.with_suffix(".json").write_text(json.dumps(meta))
        evaluate_checkpoint(str(weights), data_root=str(tiny_layout), device="cpu", output=str(tmp_path / f"o{std}"))
        losses.append(json.loads((tmp_path / f"o{std}" / "results.json").read_text())["test"]["loss"])
    assert losses[0] != losses[1]  # the recorded std reached the model's input
