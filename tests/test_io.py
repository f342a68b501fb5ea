"""Atomic writes: whole files or none, with the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat
import time

import pytest

from fervit.io import STALE_TEMP_SECONDS, atomic_write, write_json


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask_not_mkstemps_private_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "results.json", {"accuracy": 0.5})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_temporaries_left_by_a_killed_write_are_removed_by_the_next_write(tmp_path):
    orphan = tmp_path / ".best_model.safetensors.k3j_x9q2.tmp"  # what mkstemp names, from a write killed an hour ago
    live = tmp_path / ".results.json.a1b2c3d4.tmp"  # another process's write in progress
    keep = tmp_path / ".notes.tmp"  # not a name atomic_write makes
    for path in (orphan, live, keep):
        path.write_bytes(b"partial")
    old = time.time() - 2 * STALE_TEMP_SECONDS
    os.utime(orphan, (old, old))
    os.utime(keep, (old, old))
    write_json(tmp_path / "config.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, keep.name, "config.json"])
