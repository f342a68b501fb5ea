"""One other busy process, as a second training run or a test suite beside a run would be: the load the thread
and wait-policy tables are measured under."""

from __future__ import annotations

import contextlib
import subprocess
import sys

BUSY_LOOP = "while True: pass"  # one core's worth of load, and nothing else


@contextlib.contextmanager
def busy_process(active: bool = True):
    """Run one busy Python process for the `with` block (nothing when `active` is false); it is killed on exit."""
    loop = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if active else None
    try:
        yield
    finally:
        if loop is not None:
            loop.kill()
            loop.wait()
