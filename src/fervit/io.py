"""Atomic file writes: a reader (or a crash) never sees half a file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import time
from pathlib import Path

from fervit.errors import FervitError

STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a killed write (a live one is renamed in seconds)
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what mkstemp(prefix=".<name>.", suffix=".tmp") makes


class DiskFullError(FervitError, OSError):
    """A write failed because the disk (or the user's quota) is full; the CLI prints it as one line."""

    def __str__(self) -> str:
        return self.strerror


class WriteError(FervitError, OSError):
    """A write refused by the system (a read-only folder or filesystem, a missing folder, ...): one line naming
    the file, still an OSError for callers that go on without the file (e.g. the decode cache)."""

    def __str__(self) -> str:
        return self.strerror


def _umask() -> int:
    try:  # Linux says it without changing it (setting it is process-wide, so racy under threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def make_folder(path: str | os.PathLike, exist_ok: bool = True) -> Path:
    """`path` made (with its parents); a one-line WriteError when the system refuses, e.g. a read-only folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if exist_ok or not path.exists():  # exists but is not a folder
            raise WriteError(errno.EEXIST, f"cannot make the folder '{path}': a file of that name is in the way",
                             str(path)) from None
        raise
    except OSError as e:
        raise WriteError(e.errno, f"cannot make the folder '{path}' ({e.strerror or e}); make its parent writable "
                                  "or pick another folder", str(path)) from None
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Write to a temporary file beside `path`, then rename it over `path` in one step."""
    path = Path(path)
    remove_stale_temps(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _disk_full(e, path) from None
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would, so the
        # rest of a group (a shared cluster, a serving account) can read runs and checkpoints
        os.chmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FervitError):
            raise _disk_full(e, path) from None
        raise


def _disk_full(e: OSError, path: Path) -> OSError:
    """ENOSPC/EDQUOT as a one-line DiskFullError naming the file; any other OSError as a one-line WriteError."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return WriteError(e.errno, f"cannot write '{path}' ({e.strerror or e}); fervit needs to write in "
                                   f"'{path.parent}', so make it writable or pick another folder", str(path))
    return DiskFullError(e.errno, f"no space left on the device to write '{path}' ({e.strerror}); free some "
                                  "space (or pick another folder) and run again", str(path))


def remove_stale_temps(folder: str | os.PathLike, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Delete `atomic_write`'s temporary files in `folder` that a killed process left behind; returns how many.

    Only names `atomic_write` makes, and only files not touched for `older_than` seconds (a live write's is young).
    """
    removed, cutoff = 0, time.time() - older_than
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False) \
                        and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
    except OSError:  # an unlistable folder: the write itself reports what is wrong
        pass
    return removed


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
