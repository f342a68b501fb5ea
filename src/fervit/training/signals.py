"""The signals that ask training to stop for a requeue, and the exceptions a stop ends training with."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again later"; the Slurm scripts requeue the job on it
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # Slurm: preemption, and `--signal=USR1@<s>` before the time limit


class Preempted(Exception):
    """Training stopped on a signal after its `last` checkpoint was written; `fervit train --resume` continues."""

    def __init__(self, message: str, run_dir: Path | None = None, epoch: int | None = None):
        super().__init__(message)
        self.run_dir, self.epoch = run_dir, epoch


class StopNow(Exception):
    """A second stop signal: abandon the epoch in flight; the previous epoch's checkpoint stays valid."""


class StopSignals:
    """While active, the first SIGTERM/SIGUSR1 asks training to stop at the end of the epoch in flight
    (`requested` names the signal); a second one raises StopNow at once.

    Handlers are only installed from the main thread (Python's rule); elsewhere signals keep their default.
    """

    def __init__(self):
        self.requested: str = ""
        self.run_dir: Path | None = None  # set once known, for the message of a stop mid-epoch
        self._previous: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            raise StopNow(name)
        self.requested = name
        print(f"fervit: {name} received: finishing this epoch, saving a checkpoint, then exiting "
              f"(send it again to stop at once)", flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
