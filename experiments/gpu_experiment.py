"""One whole accuracy experiment for one lent GPU command (<= 10 minutes).

Trains several configurations in parallel on one GPU (each a normal `fervit train` run with a
time budget, launched by `fervit.launcher.run_jobs` (under CUDA MPS with --mps on), its
log in its run folder), then evaluates each with and without mirror TTA (and ten-crop TTA for models trained
on crops) and the requested ensembles, and packs everything for the trip back: `$OUT/summary.json`,
`$OUT/runs.tar.gz` (run folders without weights) and `$OUT/<job>.safetensors` for the best jobs' checkpoints
in fp16 (their .json descriptions are in the tarball), as many as come back from the GPU machine
(`ReturnLimits`: by default 8 files of at most 16 MiB, 64 MiB in all).

    python experiments/gpu_experiment.py --data /tmp/fer --out $OUT --plan experiments/plans/screen.json

A plan is JSON: {"budget": seconds of training per job, "jobs": [{name, preset, set: [...]}],
"ensembles": {name: [jobs]}}. A job whose preset is "@best" copies the preset and settings of the job with
the highest PublicTest accuracy in the summaries given by --pick-from (screens' summary.json files; only
the jobs its "among" list names, if it has one), then adds its own settings: the recipe is chosen on
PublicTest, never on PrivateTest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from fervit.launcher import run_jobs, train_job
from fervit.models.checkpoint import load_model, save_model
from fervit.run_folder import has_results, read_config, read_metrics, read_results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="dataset root, or a .zip of it (unpacked to /tmp/fer)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan", required=True, help="JSON: {jobs: [{name, preset, set: [...]}], ensembles: {name: [jobs]}}")
    ap.add_argument("--budget", type=float, default=None,
                    help="training seconds per job (default: the plan's budget, else 420)")
    ap.add_argument("--pick-from", nargs="+", metavar="SUMMARY",
                    help="screens' summary.json files: what a job with preset @best copies")
    ap.add_argument("--slice", type=int, default=0, metavar="N",
                    help="dry run: only the first N images of each class in each of Training, PublicTest and "
                         "PrivateTest (copied to /tmp/fer_slice)")
    ap.add_argument("--protocol", default="fer2013")
    ap.add_argument("--parallel", type=int, default=0, help="jobs at a time (default: all)")
    ap.add_argument("--mps", choices=["auto", "on", "off"], default="off",
                    help="CUDA MPS for the jobs (default off: the plans' budgets were sized for time-sliced jobs; "
                         "turn it on where the bench shows MPS working and faster)")
    ap.add_argument("--ckpt-jobs", default="", help="comma-separated jobs whose checkpoints come back (default all)")
    ap.add_argument("--return-files", type=int, default=ReturnLimits.files,
                    help=f"files $OUT may hold for the trip back (default {ReturnLimits.files})")
    ap.add_argument("--return-file-mib", type=float, default=ReturnLimits.file_mib,
                    help=f"MiB one file may have (default {ReturnLimits.file_mib:g})")
    ap.add_argument("--return-total-mib", type=float, default=ReturnLimits.total_mib,
                    help=f"MiB all of $OUT may have (default {ReturnLimits.total_mib:g})")
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
    if args.slice:
        data = data_slice(data, args.slice, Path("/tmp/fer_slice"))
    os.environ.setdefault("FERVIT_CACHE", "/tmp/fervit-cache")
    # decode once before the jobs start, so they all load the cache instead of decoding in parallel
    subprocess.run([sys.executable, "-c", f"from fervit.data.dataset import load_fer; load_fer({str(data)!r}, progress=False)"],
                   check=True)
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)
    plan = json.loads(Path(args.plan).read_text())
    plan["jobs"] = [resolve_job(job, args.pick_from) for job in plan["jobs"]]
    budget = args.budget or plan.get("budget", 420)
    # a new folder per command: a warm machine keeps /tmp between commands, and a plan run a second time into the
    # same run folders would find them finished and refuse every job
    runs_root = Path(tempfile.mkdtemp(prefix="fervit-runs-"))
    jobs, cmds = [], {}
    for job in plan["jobs"]:
        train_args = ["--preset", job["preset"], "--data", str(data), "--protocol", job.get("protocol", args.protocol),
                      "--set", f"train.time_budget_s={job.get('budget', budget)}"]
        for item in job.get("set", []):
            train_args += ["--set", item]
        jobs.append(train_job(job["name"], train_args, runs_root / job["name"]))
        cmds[job["name"]] = " ".join(jobs[-1].cmd)
    # every job its own process on the one GPU (time-sliced, or under CUDA MPS with --mps)
    results = run_jobs(jobs, parallel=args.parallel or len(jobs), mps=args.mps, progress=sys.stdout)
    summary = {"plan": plan, "budget_s": budget, "jobs": {}, "ensembles": {}, "wall_s": None}
    run_dirs = {}
    for r in results:
        if not r.ok or not has_results(r.run_dir):
            summary["jobs"][r.name] = {"error": r.error or "no results.json", "log": r.log.read_text()[-3000:]}
            continue
        run_dirs[r.name] = r.run_dir
    # every extra evaluation is its own `fervit evaluate` process; run them side by side
    evals = {}
    for name, run_dir in run_dirs.items():
        for split in ("val", "test"):
            for tta in tta_modes([run_dir]):
                evals[(name, f"{split}_acc_{TTA_KEY[tta]}")] = ([run_dir], split, tta, Path(f"/tmp/tta_{name}_{split}_{tta}"))
    for ens, members in plan.get("ensembles", {}).items():
        dirs = [run_dirs[m] for m in members if m in run_dirs]
        if len(dirs) >= 2:
            for split in ("val", "test"):
                for tta in ("none", *tta_modes(dirs)):
                    key = f"{split}_acc" + (f"_{TTA_KEY[tta]}" if tta != "none" else "")
                    evals[(f"ens:{ens}", key)] = (dirs, split, tta, Path(f"/tmp/ens_{ens}_{split}_{tta}"))
    with ThreadPoolExecutor(8) as pool:
        accs = dict(zip(evals, pool.map(lambda a: evaluate(data=data, dirs=a[0], split=a[1], tta=a[2], out=a[3]),
                                        evals.values())))
    for name, run_dir in run_dirs.items():
        res = read_results(run_dir)
        summary["jobs"][name] = {
            "run": run_dir.name, "cmd": cmds[name], "params": res.params,
            "epochs": res.epochs_completed, "best_epoch": res.best_epoch, "wall_s": res.wall_seconds,
            "val_acc": res.val["accuracy"], "test_acc": res.test["accuracy"],
            "test_macro_f1": res.test["macro_avg"]["f1"],
            "disgusted_recall": res.test["per_class"]["disgusted"]["recall"],
            **{k: v for (n, k), v in accs.items() if n == name}, **training_curve(run_dir)}
        print(name, json.dumps(summary["jobs"][name]), flush=True)
    for ens, members in plan.get("ensembles", {}).items():
        keys = {k: v for (n, k), v in accs.items() if n == f"ens:{ens}"}
        if keys:
            summary["ensembles"][ens] = {"members": members, **keys}
            print(ens, json.dumps(summary["ensembles"][ens]), flush=True)
    summary["wall_s"] = time.time() - t0
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for name, run_dir in run_dirs.items():
            tar.add(run_dir, arcname=f"{name}/{run_dir.name}",
                    filter=lambda ti: None if ti.name.endswith(".safetensors") else ti)
    wanted = [j for j in args.ckpt_jobs.split(",") if j] or sorted(
        (n for n in run_dirs if "val_acc" in summary["jobs"].get(n, {})), key=lambda n: -summary["jobs"][n]["val_acc"])
    limits = ReturnLimits(args.return_files, args.return_file_mib, args.return_total_mib)
    summary["checkpoints"] = pack_checkpoints(run_dirs, wanted, out, limits)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return 0


TTA_KEY = {"mirror": "tta", "ten_crop": "tta10"}  # summary keys: val_acc_tta, test_acc_tta10, ...


@dataclass(frozen=True)
class ReturnLimits:
    """What the GPU machine lets come back from $OUT: anything past it stays behind, so the checkpoints are
    packed best first and only while they fit. The defaults are the limits of the machines lent so far."""

    files: int = 8
    file_mib: float = 16
    total_mib: float = 64


def data_slice(root: Path, n: int, target: Path) -> Path:
    """A copy of the first n images per class and usage (Training/PublicTest/PrivateTest) of the folder layout."""
    shutil.rmtree(target, ignore_errors=True)
    for split in ("train", "test"):
        for folder in sorted((root / split).iterdir()):
            files = sorted(folder.iterdir())
            (target / split / folder.name).mkdir(parents=True)
            for usage in ("Training", "PublicTest", "PrivateTest"):
                for f in [f for f in files if f.name.startswith(usage)][:n]:
                    shutil.copy(f, target / split / folder.name / f.name)
    return target


def resolve_job(job: dict, pick_from: list[str] | None) -> dict:
    """A plan job; one whose preset is @best becomes the best job, by PublicTest accuracy, of the screens'
    summaries (among the jobs its "among" list names, when it has one)."""
    if job["preset"] != "@best":
        return job
    if not pick_from:
        raise SystemExit(f"job {job['name']} copies the best job of a screen: give --pick-from SUMMARY.json")
    candidates = {}
    for path in pick_from:
        screen = json.loads(Path(path).read_text())
        plan_jobs = {j["name"]: j for j in screen["plan"]["jobs"]}
        for name, result in screen["jobs"].items():
            if "val_acc" in result and (not job.get("among") or name in job["among"]):
                candidates[name] = (result["val_acc"], plan_jobs[name])
    if not candidates:
        raise SystemExit(f"job {job['name']}: no finished job{' among ' + ', '.join(job['among']) if job.get('among') else ''} "
                         f"in {', '.join(pick_from)}")
    best = max(candidates, key=lambda n: candidates[n][0])  # PublicTest, single model, no TTA
    val_acc, source = candidates[best]
    print(f"{job['name']}: the screens' best on PublicTest is {best} ({val_acc:.4f})", flush=True)
    settings = list(dict.fromkeys([*source.get("set", []), *job.get("set", [])]))  # in order, each once
    return {**job, "preset": source["preset"], "set": settings, "picked": best}


def tta_modes(run_dirs) -> list[str]:
    """Mirror TTA for every model, ten-crop too when every model was trained on crops."""
    takes_crops = [read_config(d, "evaluate").model.takes_crops() for d in run_dirs]
    return ["mirror", "ten_crop"] if all(takes_crops) else ["mirror"]


def training_curve(run_dir: Path) -> dict:
    """From the run's metrics: final training accuracy, training seconds, and (with train.log_test) the
    training seconds and epochs until PrivateTest accuracy first reached 70% and 73%. Reported only."""
    rows = read_metrics(run_dir) or []
    out = {"final_train_acc": rows[-1]["train_acc"], "train_s": sum(r["seconds"] for r in rows)}
    if rows and "test_acc" in rows[0]:
        out["best_logged_test_acc"] = max(r["test_acc"] for r in rows)
        for goal in (0.70, 0.73):
            elapsed = 0.0
            for r in rows:
                elapsed += r["seconds"]
                if r["test_acc"] >= goal:
                    out[f"time_to_{goal:.2f}"] = {"seconds": elapsed, "epoch": r["epoch"]}
                    break
    return out


def pack_checkpoints(run_dirs: dict, wanted: list[str], out: Path, limits: ReturnLimits = ReturnLimits()) -> dict:
    """Each wanted job's best checkpoint as `$OUT/<job>.safetensors` in fp16 (written by the package's
    `save_model`, as the model would ship), best first, while the files fit `limits`; returns what was
    packed or why not."""
    mib = 2**20
    packed, used = {}, sum(f.stat().st_size for f in out.iterdir()) + 2 * mib  # + summary.json, runs.tar.gz
    files = 2  # summary.json and runs.tar.gz
    with tempfile.TemporaryDirectory(prefix="fervit-pack-") as staging:
        for name in wanted:
            if name not in run_dirs:
                continue
            model, meta = load_model(run_dirs[name])
            meta.dtype = "float16"
            weights = save_model(model, meta, Path(staging) / f"{name}.safetensors", dtype=torch.float16)
            size = weights.stat().st_size
            if size > limits.file_mib * mib or used + size > limits.total_mib * mib or files >= limits.files:
                packed[name] = f"not packed: {size / mib:.1f} MiB in fp16 does not fit what comes back"
                continue
            shutil.move(weights, out / weights.name)  # its description is the run's own, in runs.tar.gz
            packed[name], used, files = "fp16", used + size, files + 1
    return packed


def evaluate(dirs, data, split, tta, out) -> float | None:
    """Accuracy from `fervit evaluate`, or None when it failed (the failure is printed)."""
    cmd = [sys.executable, "-m", "fervit", "evaluate", *map(str, dirs), "--split", split, "--data", str(data),
           "--output", str(out), "--tta", tta]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-1000:], flush=True)
        return None
    return getattr(read_results(out), split)["accuracy"]


if __name__ == "__main__":
    raise SystemExit(main())
