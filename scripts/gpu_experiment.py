"""One whole accuracy experiment for one lent GPU command (<= 10 minutes).

Trains several configurations in parallel on one GPU (each a normal `fervit train` run with a
time budget, launched by `fervit.training.parallel.run_jobs` under CUDA MPS where available, its
log in its run folder), then evaluates each with and without mirror TTA and the requested
ensembles, and packs everything for the trip back: `$OUT/summary.json`, `$OUT/runs.tar.gz` (run folders without
weights) and `$OUT/<job>.safetensors` for each job's best checkpoint (its .json sidecar is in the tarball).

    python scripts/gpu_experiment.py --data /tmp/fer --out $OUT --plan plans/call1.json --budget 420
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fervit.training.parallel import run_jobs, train_job


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="dataset root, or a .zip of it (unpacked to /tmp/fer)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan", required=True, help="JSON: {jobs: [{name, preset, set: [...]}], ensembles: {name: [jobs]}}")
    ap.add_argument("--budget", type=float, default=420, help="training seconds per job")
    ap.add_argument("--protocol", default="fer2013")
    ap.add_argument("--parallel", type=int, default=0, help="jobs at a time (default: all)")
    ap.add_argument("--mps", choices=["auto", "on", "off"], default="auto", help="CUDA MPS for the jobs")
    ap.add_argument("--ckpt-jobs", default="", help="comma-separated jobs whose checkpoints come back (default all)")
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    if data.suffix == ".zip":
        target = Path("/tmp/fer")
        if not target.exists():
            with zipfile.ZipFile(data) as z:
                z.extractall(target)
        data = target
    os.environ.setdefault("FERVIT_CACHE", "/tmp/fervit-cache")
    # decode once before the jobs start, so they all load the cache instead of decoding in parallel
    subprocess.run([sys.executable, "-c", f"from fervit.data.dataset import load_fer; load_fer({str(data)!r}, progress=False)"],
                   check=True)
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)
    plan = json.loads(Path(args.plan).read_text())
    runs_root = Path("/tmp/gpu_runs")
    jobs, cmds = [], {}
    for job in plan["jobs"]:
        train_args = ["--preset", job["preset"], "--data", str(data), "--protocol", job.get("protocol", args.protocol),
                      "--set", f"train.time_budget_s={job.get('budget', args.budget)}"]
        for item in job.get("set", []):
            train_args += ["--set", item]
        jobs.append(train_job(job["name"], train_args, runs_root / job["name"]))
        cmds[job["name"]] = " ".join(jobs[-1].cmd)
    # every job its own process on the one GPU, under CUDA MPS where the machine has it
    results = run_jobs(jobs, parallel=args.parallel or len(jobs), mps=args.mps, progress=sys.stdout)
    summary = {"plan": plan, "jobs": {}, "ensembles": {}, "wall_s": None}
    run_dirs = {}
    for r in results:
        if not r.ok or not (r.run_dir / "results.json").is_file():
            summary["jobs"][r.name] = {"error": r.error or "no results.json", "log": r.log.read_text()[-3000:]}
            continue
        run_dirs[r.name] = r.run_dir
    # every extra evaluation is its own `fervit evaluate` process; run them side by side
    evals = {}
    for name, run_dir in run_dirs.items():
        for split in ("val", "test"):
            evals[(name, f"{split}_acc_tta")] = ([run_dir], split, True, Path(f"/tmp/tta_{name}_{split}"))
    for ens, members in plan.get("ensembles", {}).items():
        dirs = [run_dirs[m] for m in members if m in run_dirs]
        if len(dirs) >= 2:
            for split in ("val", "test"):
                for tta in (False, True):
                    key = f"{split}_acc" + ("_tta" if tta else "")
                    evals[(f"ens:{ens}", key)] = (dirs, split, tta, Path(f"/tmp/ens_{ens}_{split}_{tta}"))
    with ThreadPoolExecutor(8) as pool:
        accs = dict(zip(evals, pool.map(lambda a: evaluate(data=data, dirs=a[0], split=a[1], tta=a[2], out=a[3]),
                                        evals.values())))
    for name, run_dir in run_dirs.items():
        res = json.loads((run_dir / "results.json").read_text())
        summary["jobs"][name] = {
            "run": run_dir.name, "cmd": cmds[name], "params": res["params"],
            "epochs": res["epochs_completed"], "best_epoch": res["best_epoch"], "wall_s": res["wall_seconds"],
            "val_acc": res["val"]["accuracy"], "test_acc": res["test"]["accuracy"],
            "test_macro_f1": res["test"]["macro_avg"]["f1"],
            "disgusted_recall": res["test"]["per_class"]["disgusted"]["recall"],
            "val_acc_tta": accs[(name, "val_acc_tta")], "test_acc_tta": accs[(name, "test_acc_tta")]}
        print(name, json.dumps(summary["jobs"][name]), flush=True)
    for ens, members in plan.get("ensembles", {}).items():
        keys = {k: v for (n, k), v in accs.items() if n == f"ens:{ens}"}
        if keys:
            summary["ensembles"][ens] = {"members": members, **keys}
            print(ens, json.dumps(summary["ensembles"][ens]), flush=True)
    summary["wall_s"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for name, run_dir in run_dirs.items():
            tar.add(run_dir, arcname=f"{name}/{run_dir.name}",
                    filter=lambda ti: None if ti.name.endswith(".safetensors") else ti)
    wanted = [j for j in args.ckpt_jobs.split(",") if j] or list(run_dirs)
    for name in wanted[:6]:
        if name in run_dirs:
            shutil.copy(run_dirs[name] / "best_model.safetensors", out / f"{name}.safetensors")
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return 0


def evaluate(dirs, data, split, tta, out) -> float | None:
    """Accuracy from `fervit evaluate`, or None when it failed (the failure is printed)."""
    cmd = [sys.executable, "-m", "fervit", "evaluate", *map(str, dirs), "--split", split, "--data", str(data),
           "--output", str(out)] + (["--tta"] if tta else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-1000:], flush=True)
        return None
    return json.loads((out / "results.json").read_text())[split]["accuracy"]


if __name__ == "__main__":
    raise SystemExit(main())
