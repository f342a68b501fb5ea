"""The run folder's lock for a run of one or several processes: rank 0 holds it for all of them."""

from __future__ import annotations

from pathlib import Path

from fervit.errors import FervitError
from fervit.run_folder import FolderLock
from fervit.training.distributed import DistContext, broadcast_value


class RunLock:
    """`run_folder.FolderLock` taken by rank 0 while it trains into the folder; every rank hears a refusal."""

    def __init__(self):
        self._lock = FolderLock()

    def acquire(self, run_dir: str | Path | None, ctx: DistContext) -> None:
        """Take the lock on `run_dir` unless held already (a folder that does not exist yet is left for a later
        call). Collective under DDP: only rank 0 locks, and every rank raises its one-line error."""
        error = ""
        if ctx.is_main and not self._lock.held and run_dir is not None and Path(run_dir).is_dir():
            error = self._lock.take(Path(run_dir))
        error = broadcast_value(error, ctx)
        if error:
            raise FervitError(error)

    def release(self) -> None:
        self._lock.release()
