"""Progressive self-distillation (`optim.self_distill`): the ramp, the targets, the run, resume, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_layout
from helpers import signal_at_step, tiny_model, tiny_run_config

from fervit.cli import main
from fervit.config import apply_overrides, load_preset
from fervit.errors import FervitError
from fervit.training.checkpoint import load_last
from fervit.training.epoch import self_distill_weight
from fervit.training.schedule import build_schedule
from fervit.training.signals import Preempted
from fervit.training.step import TrainStep
from fervit.training.trainer import train

SLOW_FIXTURES = {"reference"}


def test_the_weight_rises_linearly_from_zero_in_epoch_one_to_the_setting_in_the_last():
    assert [self_distill_weight(0.8, e, 5) for e in range(1, 6)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert self_distill_weight(0.8, 1, 1) == 0.0  # a one-epoch run has no previous predictions to use
    assert self_distill_weight(0.0, 4, 5) == 0.0


def test_the_step_trains_on_the_soft_targets_it_is_given_and_keeps_its_logits():
    cfg = apply_overrides(load_preset("tiny"), ["optim.self_distill=0.5", "optim.label_smoothing=0.1",
                                                "augment.enabled=false"])
    model = tiny_model(seed=0).eval()  # eval: no dropout, so a second forward gives the same logits
    opt = torch.optim.AdamW(model.parameters())
    step = TrainStep(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, build_schedule(cfg.optim, 10, 2)), cfg)
    x, y = torch.randn(6, 1, 48, 48), torch.randint(0, 7, (6,))
    soft = torch.softmax(torch.randn(6, 7), -1)
    loss, _, _, logits = step._forward_loss(x, soft, y, y)
    want = F.cross_entropy(model(x), soft, label_smoothing=0.1)
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(logits, model(x).detach())
    one_hot, _, _, _ = step._forward_loss(x, F.one_hot(y, 7).float(), y, y)  # a one-hot target is the label
    torch.testing.assert_close(one_hot, F.cross_entropy(model(x), y, label_smoothing=0.1).detach())


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("self_distill") / "fer", per_class=6)


def self_distill_config(layout: Path, out: Path, *extra: str):
    return tiny_run_config("train.epochs=4", "train.batch_size=16", "optim.self_distill=0.6", *extra, root=layout,
                           output=out)


@pytest.fixture(scope="module")
def reference(layout) -> Path:
    return train(self_distill_config(layout, layout.parent / "reference"), quiet=True)


def rows(run: Path) -> list[str]:
    """The metrics rows without their wall-clock column (the last)."""
    return [r.rsplit(",", 1)[0] for r in (run / "training_metrics.csv").read_text().splitlines()]


@pytest.mark.slow
def test_the_run_keeps_a_prediction_per_trained_image_and_epoch_one_is_a_plain_epoch(layout, reference):
    soft = load_last(reference).tensors["soft"]
    from fervit.data.dataset import load_fer

    data = load_fer(layout, progress=False)
    torch.testing.assert_close(soft.sum(1), torch.ones(len(soft)))
    # the split trains on 35 of train/'s 42 faces (7 validate) and each epoch draws 32 of them (the partial batch
    # is dropped): those hold a prediction, not their label; validation and test faces keep their labels
    is_label = (soft == F.one_hot(data.labels, 7).float()).all(1)
    assert 32 <= int((~is_label).sum()) <= 35 and is_label[data.usage != 1].all()
    plain = train(tiny_run_config("train.epochs=4", "train.batch_size=16", root=layout,
                                  output=layout.parent / "plain"), quiet=True)
    assert rows(reference)[:2] == rows(plain)[:2]  # the header and epoch 1: the weight is 0 there
    assert rows(reference)[2:] != rows(plain)[2:]


@pytest.mark.slow
def test_a_self_distilled_run_resumes_exactly(layout, reference, monkeypatch, tmp_path):
    signal_at_step(monkeypatch, 2 * (35 // 16) + 2)  # the second step of epoch 3
    with pytest.raises(Preempted) as stop:
        train(self_distill_config(layout, tmp_path), quiet=True)
    monkeypatch.undo()
    train(self_distill_config(layout, tmp_path), quiet=True, run_dir=stop.value.run_dir, resume=True)
    assert rows(stop.value.run_dir) == rows(reference)


def test_self_distillation_with_mixed_images_is_one_line_before_any_data_is_read(tmp_path, capsys):
    code = main(["train", "--preset", "tiny", "--data", str(tmp_path / "no_data_here"), "--output", str(tmp_path),
                 "--set", "optim.self_distill=0.5", "--set", "augment.mixup_alpha=0.2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "optim.self_distill" in err and "mixup" in err and "\n" not in err


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_a_self_distillation_weight_outside_0_1_is_refused(value):
    with pytest.raises(FervitError, match="optim.self_distill"):
        apply_overrides(load_preset("tiny"), [f"optim.self_distill={value}"])
