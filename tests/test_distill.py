"""Knowledge distillation (`optim.distill_from`): the loss, the run, resume, and bad teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_layout
from helpers import signal_at_step, save_tiny_checkpoint, tiny_model, tiny_run_config

from fervit.cli import main
from fervit.config import apply_overrides, load_preset
from fervit.errors import FervitError
from fervit.models.checkpoint import load_model
from fervit.training.schedule import build_schedule
from fervit.training.signals import Preempted
from fervit.training.step import TrainStep
from fervit.training.teachers import Teachers, distillation_loss
from fervit.training.trainer import train

SLOW_FIXTURES = {"teacher", "reference"}


def test_the_loss_is_the_weighted_sum_of_the_label_and_teacher_terms():
    cfg = apply_overrides(load_preset("tiny"), ["optim.distill_weight=0.3", "optim.distill_temperature=2.0",
                                                "optim.label_smoothing=0.1"])
    student, teacher = tiny_model(seed=0).eval(), tiny_model(seed=1)  # eval: no dropout between the two calls
    teachers = Teachers([teacher.eval()], 2.0, None)
    opt = torch.optim.AdamW(student.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, build_schedule(cfg.optim, 10, 2))
    step = TrainStep(student, opt, sched, cfg, teachers=teachers)
    x, y = torch.randn(6, 1, 48, 48), torch.randint(0, 7, (6,))
    loss, objective, _, _ = step._forward_loss(x, y, y, y)
    logits = student(x)
    soft = F.softmax(teacher(x) / 2.0, -1)
    label_term = F.cross_entropy(logits, y, label_smoothing=0.1)
    teacher_term = 4.0 * F.kl_div(F.log_softmax(logits / 2.0, -1), soft, reduction="batchmean")
    torch.testing.assert_close(objective, 0.7 * label_term + 0.3 * teacher_term)
    torch.testing.assert_close(loss, objective.detach())


def test_the_teacher_term_pulls_the_student_towards_the_teacher_only():
    """Its gradient is the KL divergence's: zero where the student's softened prediction is the teacher's."""
    logits = torch.randn(5, 7, requires_grad=True)
    loss = distillation_loss(logits, F.softmax(logits.detach() / 2.0, -1), 2.0, 5)
    loss.backward()
    assert abs(loss.item()) < 1e-5 and logits.grad.abs().max() < 1e-6
    other = distillation_loss(torch.randn(5, 7), F.softmax(logits.detach() / 2.0, -1), 2.0, 5)
    assert other > 0.01


def test_two_teachers_average_their_softened_probabilities():
    a, b = tiny_model(seed=1).eval(), tiny_model(seed=2).eval()
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        want = (F.softmax(a(x) / 3.0, -1) + F.softmax(b(x) / 3.0, -1)) / 2
    torch.testing.assert_close(Teachers([a, b], 3.0, None)(x), want)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("distill") / "fer", per_class=6)


@pytest.fixture(scope="module")
def teacher(layout) -> Path:
    """A tiny run trained on the layout from another seed than the students: the teacher."""
    return train(tiny_run_config("train.epochs=4", "train.batch_size=16", "train.seed=1", root=layout,
                                 output=layout.parent / "teacher"), quiet=True)


def distill_config(layout: Path, out: Path, teacher: Path, *extra: str):
    return tiny_run_config("train.epochs=4", "train.batch_size=16", f"optim.distill_from={teacher}",
                           "optim.distill_weight=0.9", "optim.distill_temperature=2", *extra, root=layout, output=out)


def disagreement(run: Path, teacher: Path, layout: Path) -> float:
    """KL(teacher || model) on the layout's test faces."""
    from fervit.data.dataset import load_fer
    from fervit.data.images import normalize

    data = load_fer(layout, progress=False)
    x = normalize(data.images[data.folder == 1])
    (s, _), (t, _) = load_model(run), load_model(teacher)
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(s(x), -1), F.log_softmax(t(x), -1), log_target=True,
                              reduction="batchmean"))


@pytest.fixture(scope="module")
def reference(layout, teacher) -> Path:
    return train(distill_config(layout, layout.parent / "reference", teacher), quiet=True)


@pytest.mark.slow
def test_a_distilled_student_ends_closer_to_its_teacher_than_one_trained_on_labels(layout, teacher, reference):
    plain = train(tiny_run_config("train.epochs=4", "train.batch_size=16", "train.seed=0", root=layout,
                                  output=layout.parent / "plain"), quiet=True)
    assert disagreement(reference, teacher, layout) < disagreement(plain, teacher, layout)
    config = json.loads((reference / "config.json").read_text())
    assert config["optim"]["distill_from"] == [str(teacher)]


@pytest.mark.slow
def test_a_distilled_run_resumes_exactly(layout, teacher, reference, monkeypatch, tmp_path):
    signal_at_step(monkeypatch, 2 * (35 // 16) + 2)  # the second step of epoch 3
    with pytest.raises(Preempted) as stop:
        train(distill_config(layout, tmp_path, teacher), quiet=True)
    monkeypatch.undo()
    train(distill_config(layout, tmp_path, teacher), quiet=True, run_dir=stop.value.run_dir, resume=True)
    rows = lambda run: [r.rsplit(",", 1)[0] for r in (run / "training_metrics.csv").read_text().splitlines()]  # noqa: E731
    assert rows(stop.value.run_dir) == rows(reference)


def test_a_missing_teacher_is_one_line_before_any_data_is_read(tmp_path, capsys):
    code = main(["train", "--preset", "tiny", "--data", str(tmp_path / "no_data_here"), "--output", str(tmp_path),
                 "--set", f"optim.distill_from={tmp_path / 'nope'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope" in err and "does not exist" in err and "\n" not in err


def test_a_teacher_fed_other_faces_is_one_line(tmp_path, layout):
    weights = save_tiny_checkpoint(tmp_path / "teacher", crop_size=40)  # trained on 40px crops; the student: 48px
    with pytest.raises(FervitError, match="takes 40px faces but this run trains on 48px"):
        train(tiny_run_config("train.epochs=1", f"optim.distill_from={weights}", root=layout,
                              output=tmp_path / "runs"), quiet=True)


def test_a_teacher_with_other_classes_is_one_line(tmp_path, layout):
    weights = save_tiny_checkpoint(tmp_path / "teacher")
    meta = json.loads(weights.with_suffix(".json").read_text())
    meta["classes"] = meta["classes"][1:] + meta["classes"][:1]  # the same names in another order
    weights.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(FervitError, match="in that order"):
        train(tiny_run_config("train.epochs=1", f"optim.distill_from={weights}", root=layout,
                              output=tmp_path / "runs"), quiet=True)


@pytest.mark.parametrize("key, value", [("optim.distill_weight", "1.5"), ("optim.distill_temperature", "0")])
def test_distillation_settings_out_of_range_are_refused(key, value):
    with pytest.raises(FervitError, match=key):
        apply_overrides(load_preset("tiny"), [f"{key}={value}"])
