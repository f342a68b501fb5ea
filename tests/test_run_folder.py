"""The run folder's files, read and written through fervit.run_folder only."""

from __future__ import annotations

import json

import pytest

from fervit.config import RunConfig
from fervit.errors import FervitError
from fervit.run_folder import (CONFIG, METRICS, RESULTS, TRIAL, DamagedResults, FolderLock, Results, Trial,
                               config_to_resume, progress_line, read_config, read_metrics, read_results, read_trial,
                               set_results_aside, write_config, write_metrics, write_results, write_trial)

ROW = {"epoch": 1, "lr": 1e-3, "train_loss": 1.5, "train_acc": 0.4, "val_loss": 1.6, "val_acc": 0.375, "seconds": 2.0}


def test_results_keep_the_keys_this_fervit_does_not_know_and_drop_none_of_its_own(tmp_path):
    written = {"model": "vit_cnn", "params": 10, "best_val_acc": 0.5, "interrupted": False, "future_key": [1, 2],
               "test": {"accuracy": 0.25, "tta": "mirror"}}
    (tmp_path / RESULTS).write_text(json.dumps(written))
    results = read_results(tmp_path)
    assert (results.model, results.params, results.best_val_acc, results.interrupted) == ("vit_cnn", 10, 0.5, False)
    assert results.other == {"future_key": [1, 2]} and results.split_tta("test") == "mirror"
    write_results(tmp_path, results)
    assert json.loads((tmp_path / RESULTS).read_text()) == written


def test_results_that_are_not_a_json_object_are_damaged_and_a_folder_without_any_has_none(tmp_path):
    assert read_results(tmp_path) is None
    for text in ("{not json", "[1, 2]"):
        (tmp_path / RESULTS).write_text(text)
        with pytest.raises(DamagedResults):
            read_results(tmp_path)


def test_a_run_stopped_by_the_pruner_says_so_and_one_stopped_early_does_not():
    assert Results(stopped="pruned by the sweep after epoch 2").was_pruned
    assert not Results(stopped="early stop: no better validation accuracy for 3 epochs").was_pruned
    assert not Results().was_pruned


def test_results_set_aside_move_to_the_epoch_they_were_written_at(tmp_path):
    write_results(tmp_path, Results(model="cpu", epochs_completed=3))
    set_results_aside(tmp_path, 3)
    assert not (tmp_path / RESULTS).exists()
    assert json.loads((tmp_path / "results_at_epoch3.json").read_text())["epochs_completed"] == 3


def test_config_metrics_and_trial_read_back_what_was_written(tmp_path):
    cfg = RunConfig()
    cfg.train.epochs = 7
    write_config(tmp_path, cfg)
    assert read_config(tmp_path, "test").to_dict() == cfg.to_dict() == config_to_resume(tmp_path).to_dict()
    assert read_metrics(tmp_path) is None and progress_line(tmp_path) == ""
    write_metrics(tmp_path, [ROW])
    assert read_metrics(tmp_path) == [ROW]
    assert progress_line(tmp_path) == "epoch 1/7, val acc 0.375"
    trial = Trial("study", "sqlite:///x.db", 3, {"optim.lr": 0.001}, False)
    write_trial(tmp_path, trial)
    assert read_trial(tmp_path) == trial
    assert json.loads((tmp_path / TRIAL).read_text())["trial"] == 3


def test_progress_of_a_damaged_run_is_blank_and_a_damaged_config_is_one_line(tmp_path):
    (tmp_path / CONFIG).write_text("{")
    (tmp_path / METRICS).write_text("nonsense\n")
    assert progress_line(tmp_path) == ""
    with pytest.raises(FervitError, match="cannot resume .*config.json is damaged"):
        config_to_resume(tmp_path)
    with pytest.raises(FervitError, match="no such folder"):
        config_to_resume(tmp_path / "missing")


def test_a_second_folder_lock_is_refused_naming_the_holder(tmp_path):
    first, second = FolderLock(), FolderLock()
    assert first.take(tmp_path) == "" and first.held
    try:
        assert "is in use by another fervit process (PID" in second.take(tmp_path)
        assert not second.held
    finally:
        first.release()
    assert second.take(tmp_path) == ""
    second.release()
