"""The table of all runs under a folder (`fervit runs`), read through fervit.run_folder."""

from __future__ import annotations

import warnings
from pathlib import Path

from fervit.run_folder import RESULTS, DamagedResults, read_results


def collect_runs(root: str | Path) -> list[dict]:
    """One summary per run folder under `root` (searched recursively), oldest first."""
    rows = []
    for results_path in sorted(Path(root).rglob(RESULTS)):
        run = results_path.parent
        try:
            res = read_results(run)
        except DamagedResults:
            res = None
        if res is None:
            warnings.warn(f"left out {run}: its results.json is damaged or not a fervit results file", stacklevel=2)
            continue
        rows.append({
            "run": str(run),
            "model": "?" if res.model is None else res.model,
            "params": res.params,
            "protocol": "?" if res.protocol is None else res.protocol,
            "best_val_acc": res.best_val_acc,
            "test_acc": (res.test or {}).get("accuracy"),
            # `fervit evaluate --tta` rewrites the test section: the table says so beside the number
            "test_tta": res.split_tta("test"),
            "epochs": res.epochs_completed,
            "wall_s": res.wall_seconds,
        })
    return rows


def format_runs_table(rows: list[dict]) -> str:
    if not rows:
        return "no runs found"
    headers = ("run", "model", "params", "protocol", "epochs", "best val acc", "test acc", "wall time")

    def pct(v):
        return "-" if v is None else f"{v:.2%}"

    body = [(Path(r["run"]).name, r["model"], "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M",
             r["protocol"], "-" if r["epochs"] is None else str(r["epochs"]), pct(r["best_val_acc"]),
             pct(r["test_acc"]) + ("" if r.get("test_tta", "none") in ("none", "false") else f" ({r['test_tta']})"),
             "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}s") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
