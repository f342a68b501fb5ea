"""Progress bars for every command that runs more than a few seconds: drawn on stderr only where it is a terminal.

Into a log file (stdout/stderr redirected) tqdm wrote thousands of carriage-return updates per run (453 KB for 10
epochs); tqdm's disable=None turns a bar off where stderr is not a TTY, so a log gets the commands' own lines only.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, total: int | None = None, desc: str = "", quiet: bool = False, unit: str = "img",
                 **kwargs) -> tqdm:
    """A tqdm bar on stderr, drawn only where stderr is a terminal, never when `quiet`."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True if quiet else None, file=sys.stderr,
                dynamic_ncols=True, **kwargs)
