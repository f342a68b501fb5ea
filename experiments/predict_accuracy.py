#!/usr/bin/env python3
"""Accuracy of `fervit predict --no-detect` on a split's image files, as a user would get it.

    python experiments/predict_accuracy.py [--data ROOT] [--usage PrivateTest] [-- extra predict flags]

Runs `fervit predict --no-detect --csv` on every `test/<class>/<usage>_*` file (the Kaggle layout) and
compares each face's emotion with its class folder. Prints one line: accuracy, faces, the command.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
from pathlib import Path

from fervit.data.location import resolve_data_root
from fervit.data.dataset import CLASSES, class_index


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="", help="dataset root (default: as fervit resolves it)")
    ap.add_argument("--usage", default="PrivateTest", help="file-name prefix of the split (default PrivateTest)")
    ap.add_argument("predict_args", nargs="*", help="more `fervit predict` flags, after --")
    args = ap.parse_args()
    root = Path(resolve_data_root(args.data))
    files = sorted(p for p in (root / "test").glob(f"*/{args.usage}_*") if p.is_file())
    if not files:
        print(f"predict_accuracy: no test/<class>/{args.usage}_* files under '{root}'", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "fervit", "predict", "--no-detect", "--csv", "--quiet", *args.predict_args]
    done = subprocess.run(cmd + [str(p) for p in files], capture_output=True, text=True)
    if done.returncode not in (0, 1):
        print(f"predict_accuracy: fervit predict failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 2
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    truth = {str(p): CLASSES[i] if (i := class_index(p.parent.name)) is not None else p.parent.name.lower()
             for p in files}
    key = next(k for k in ("file", "path", "image") if rows and k in rows[0])
    scored = [(truth[r[key]], r["emotion"]) for r in rows if r.get("emotion") and r[key] in truth]
    correct = sum(t == e for t, e in scored)
    print(f"{args.usage}: {correct / len(scored):.4f} ({correct}/{len(scored)} faces, {len(files)} files) | "
          f"{' '.join(cmd[1:])} <files>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
