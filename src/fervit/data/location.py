"""Where the FER-2013 data is: one rule for every command and script (the README's "Data" section)."""

from __future__ import annotations

import os
from pathlib import Path

from fervit.errors import FervitError

DATA_FOLDER = "emotion_detection_fer"


def fetch_folder() -> Path:
    """Where `fervit data fetch` puts the dataset by default: the user's data folder (platformdirs), so that every
    command finds it from any working directory."""
    import platformdirs

    return Path(platformdirs.user_data_dir("fervit")) / DATA_FOLDER


def data_search_path() -> list[Path]:
    """The folders tried, in order, when neither --data (data.root) nor $FERVIT_DATA names the data: the README's
    "Data" section states the same rule, and every command and script goes through `resolve_data_root`."""
    return [Path("data") / DATA_FOLDER,  # inside the clone (where a user unpacks it)
            Path("..") / "shared" / "data" / DATA_FOLDER,  # beside the clone, as the project's machines lay it out
            fetch_folder()]


def resolve_data_root(root: str) -> str:
    """The data folder: `root` when given (--data, data.root), else $FERVIT_DATA, else the first folder of
    `data_search_path()` that exists (as an absolute path, so a run's config.json still finds it from elsewhere);
    a one-line error naming every place looked at when there is none."""
    if root:
        return root
    env = os.environ.get("FERVIT_DATA", "")
    if env:
        if not Path(env).expanduser().exists():
            raise FervitError(f"$FERVIT_DATA names '{env}', which does not exist; point it at the FER-2013 folder "
                              "(or unset it to use the default places)")
        return env
    tried = data_search_path()
    for path in tried:
        if path.exists():
            return str(path.absolute())
    raise FervitError("no FER-2013 data found: no --data given, $FERVIT_DATA not set, and none of "
                      + ", ".join(f"'{p.absolute()}'" for p in tried) + " exists; pass --data ROOT, set FERVIT_DATA, "
                      "or download it with `fervit data fetch` (into the last of those)")
