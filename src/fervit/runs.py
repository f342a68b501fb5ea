"""Run folders: naming, the metrics CSV, and the table of all runs."""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from pathlib import Path

from fervit.config import RunConfig
from fervit.errors import FervitError
from fervit.io import atomic_write, make_folder

METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
OPTIONAL_METRIC_FIELDS = ("test_acc",)  # train.log_test


def read_run_config(run_dir: str | Path, action: str) -> RunConfig | None:
    """A run folder's config.json as a RunConfig; None when the folder has none; a one-line error naming
    `action` (e.g. "resume", "evaluate") when it is damaged or not a fervit config."""
    path = Path(run_dir).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FervitError(f"cannot {action} '{path.parent}': its config.json is damaged ({e}); it says which "
                          "data, protocol and model the run used") from None
    except FervitError as e:
        raise FervitError(f"cannot {action} '{path.parent}': its config.json does not fit this fervit ({e})") from None


def make_run_dir(output: str | Path, cfg: RunConfig) -> Path:
    """runs/<YYYYmmdd_HHMMSS>_<model>_ed<dim>_d<depth>_h<heads>_lr<lr>/ (a timm backbone: _timm_<backbone>_in<size>_lr<lr>/),
    made unique with a suffix."""
    m = cfg.model
    if m.name == "timm":
        shape = f"{m.backbone.replace('/', '-')}_in{m.input_size or m.img_size}"
    else:
        shape = f"ed{m.embed_dim}_d{m.depth}_h{m.num_heads}"
    base = f"{time.strftime('%Y%m%d_%H%M%S')}_{m.name}_{shape}_lr{cfg.optim.lr:g}"
    out = make_folder(output)
    for n in range(1, 1000):
        path = out / (base if n == 1 else f"{base}_{n}")
        try:
            return make_folder(path, exist_ok=False)
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a unique run folder under {out}")


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    extra = tuple(k for k in OPTIONAL_METRIC_FIELDS if rows and k in rows[0])
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + extra, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def read_metrics_csv(path: Path) -> list[dict]:
    """The rows of a run's training_metrics.csv; a one-line error naming the line when it is damaged."""
    line = 1
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not set(METRIC_FIELDS[:1] + METRIC_FIELDS[2:6]) <= set(reader.fieldnames or ()):
                raise ValueError(f"its header is {reader.fieldnames}, expected {','.join(METRIC_FIELDS)}")
            rows = []
            for row in reader:
                line = reader.line_num
                rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()})
            return rows
    except (ValueError, TypeError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
        raise FervitError(f"'{path}' is damaged (line {line}: {e}); the metrics of each epoch cannot be read") \
            from None


def collect_runs(root: str | Path) -> list[dict]:
    """One summary per run folder under `root` (searched recursively), oldest first."""
    rows = []
    for results_path in sorted(Path(root).rglob("results.json")):
        run = results_path.parent
        try:
            res = json.loads(results_path.read_bytes())
        except (OSError, ValueError):
            res = None
        if not isinstance(res, dict):
            warnings.warn(f"left out {run}: its results.json is damaged or not a fervit results file", stacklevel=2)
            continue
        rows.append({
            "run": str(run),
            "model": res.get("model", "?"),
            "params": res.get("params"),
            "protocol": res.get("protocol", "?"),
            "best_val_acc": res.get("best_val_acc"),
            "test_acc": (res.get("test") or {}).get("accuracy"),
            # `fervit evaluate --tta` rewrites the test section: the table says so beside the number
            "test_tta": str((res.get("test") or {}).get("tta", res.get("tta", "none"))).lower(),
            "epochs": res.get("epochs_completed"),
            "wall_s": res.get("wall_seconds"),
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
