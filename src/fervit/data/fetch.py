"""`fervit data fetch`: the Kaggle dataset through kagglehub, or one sentence on what to do instead."""

from __future__ import annotations

import shutil
from pathlib import Path

from fervit.errors import FervitError

KAGGLE_DATASET = "ananthu017/emotion-detection-fer"
MANUAL = (f"download https://www.kaggle.com/datasets/{KAGGLE_DATASET} by hand and unpack it so that "
          "train/ and test/ sit in the folder you pass as --data")


def fetch(dest: str | Path) -> str:
    """Download into kagglehub's cache and copy train/ and test/ into `dest`; returns a summary line."""
    try:
        import kagglehub
    except ImportError:
        raise FervitError(f"kagglehub is not installed (pip install 'fervit[fetch]'); or {MANUAL}") from None
    try:
        src = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as e:  # no network, no credentials, or Kaggle said no: all end the same way for the user
        raise FervitError(f"could not download from Kaggle ({type(e).__name__}); set up Kaggle credentials "
                          f"(~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY) and network access, or {MANUAL}") \
            from None
    dest = Path(dest)
    for split in ("train", "test"):
        found = next(src.rglob(split), None)
        if found is None or not found.is_dir():
            raise FervitError(f"the download in {src} has no {split}/ folder; {MANUAL}")
        shutil.copytree(found, dest / split, dirs_exist_ok=True)
    from fervit.data.location import fetch_folder

    if dest.absolute() == fetch_folder().absolute():  # where every command looks: no --data needed
        return f"FER-2013 is in {dest}; every fervit command finds it there, e.g. fervit train --preset small"
    return f"FER-2013 is in {dest}; train with: fervit train --data {dest}"
