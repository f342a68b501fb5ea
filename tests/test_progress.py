"""Commands that run for more than a few seconds show a progress bar on a terminal, and none into a log file."""

from __future__ import annotations

import io
import sys

import pytest
from conftest import make_layout
from helpers import save_tiny_checkpoint

from fervit.cli import main
from fervit.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty,drawn", [(True, True), (False, False)])
def test_a_bar_is_drawn_only_on_a_terminal(monkeypatch, tty, drawn):
    err = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    for _ in progress_bar(range(3), desc="working"):
        pass
    assert ("working" in err.getvalue()) == drawn


@pytest.mark.slow
@pytest.mark.e2e
def test_evaluate_export_and_audit_show_progress_on_a_terminal(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="export needs the onnx extra")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # in the test itself: pytest re-captures stderr after set-up
    data = make_layout(tmp_path / "fer", per_class=2)
    run = save_tiny_checkpoint(tmp_path / "run").parent
    assert main(["data", "audit", str(data)]) == 0
    assert "auditing" in terminal.getvalue()
    assert main(["evaluate", str(run), "--data", str(data), "--device", "cpu"]) == 0
    assert "evaluating" in terminal.getvalue()
    assert main(["export", str(run), "--data", str(data), "--check-images", "8"]) == 0
    assert "checking ONNX against PyTorch" in terminal.getvalue()
