"""`fervit data audit` on the real data finds what the data README documents."""

from __future__ import annotations

import pytest
import torch

from fervit.data.audit import audit, dhash, format_audit
from fervit.data.dataset import load_fer


@pytest.mark.slow
def test_real_data_audit_matches_the_documented_duplicate_counts(real_data):
    report = audit(load_fer(real_data, progress=False))
    exact = report["exact_duplicates"]
    assert (exact["groups"], exact["files"], exact["across_splits"], exact["conflicting_labels"]) == (1516, 3369, 531, 57)
    assert report["blank_frames"]["count"] > 0
    assert "1516 groups" in format_audit(report)


def test_dhash_ignores_brightness_but_not_content():
    torch.manual_seed(0)
    face = torch.randint(40, 200, (1, 48, 48), dtype=torch.uint8)
    brighter = (face.int() + 30).clamp(max=255).to(torch.uint8)
    other = torch.randint(40, 200, (1, 48, 48), dtype=torch.uint8)
    h = dhash(torch.cat([face, brighter, other]))
    assert h[0] == h[1] and h[0] != h[2]
