"""Training img/s on a CPU with each pipeline in a fresh process, under the OpenMP wait policy it really runs with.

OpenMP reads OMP_WAIT_POLICY once, when torch loads, so one bench process cannot time both pipelines under
their own policies. `fervit bench` itself sleeps (PASSIVE, as every command but a training run does), which
understates `fervit train`: a single run on an idle machine spins (`fervit.omp`), 29-54% faster on the 2-core
machine. And a user's script sets nothing, so OpenMP's default applies to it. This section gives both:
- fervit: the trainer's `TrainStep` on the train/ images, under the policy `fervit train` would choose now;
- usual: the per-image DataLoader pipeline in fp32 NCHW (`benchmark.pipelines`), with the wait-policy variables
  fervit set removed from its environment.

    python -m fervit.benchmark.as_run ROOT [PRESET] [--rounds 3]  (the section alone; `fervit bench` runs it too)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from fervit import omp
from fervit.errors import FervitError

def environments() -> dict[str, tuple[dict, str]]:
    """pipeline -> (its environment, how its threads wait) for the two child processes."""
    user = {k: v for k, v in os.environ.items() if not omp.set_by_fervit(k)}
    fervit = dict(user)
    if "OMP_WAIT_POLICY" in user:
        fervit_wait = f"{user['OMP_WAIT_POLICY']} (set in the environment)"
    else:
        policy, why = omp.wait_policy(["train"], omp.busy_cores())
        fervit["OMP_WAIT_POLICY"] = policy
        fervit_wait = f"{policy}, as `fervit train` chooses it ({why})"
    usual_wait = (f"{user['OMP_WAIT_POLICY']} (set in the environment)" if "OMP_WAIT_POLICY" in user
                  else "OpenMP's default (a user's script sets nothing)")
    return {"fervit": (fervit, fervit_wait), "usual": (user, usual_wait)}


def as_run_rows(root: str, preset: str, batch_size: int, steps: int, warmup: int, rounds: int, workers: int,
                threads: int, cache_dir: str | None, pipelines: tuple[str, ...] = ("fervit", "usual")) -> dict:
    """{pipeline: {"train_images_s", "omp_wait"}} and, with both, "ratio": each timed in a fresh process.

    The pipelines take turns for `rounds` rounds and each keeps its best: this VM's speed drifts by a quarter
    within minutes, and one timing each would compare two moments as much as two pipelines."""
    rows: dict = {}
    envs = {name: env for name, env in environments().items() if name in pipelines}
    for _ in range(rounds):
        for pipeline, (env, wait) in envs.items():
            cmd = [sys.executable, "-m", "fervit.benchmark.as_run", "--child", pipeline, str(root), preset,
                   "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup),
                   "--workers", str(workers), "--threads", str(threads)]
            if cache_dir:
                cmd += ["--cache-dir", str(cache_dir)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise FervitError(f"the bench's fresh {pipeline} process failed: {last}")
            timed = json.loads(done.stdout.strip().splitlines()[-1])
            row = rows.setdefault(pipeline, {"train_images_s": 0.0, "timings": [], "omp_wait": wait,
                                             "batch_size": batch_size, "steps": steps, "rounds": rounds})
            row["timings"].append(timed["train_images_s"])
            row["train_images_s"] = max(row["timings"])
            row.update({k: v for k, v in timed.items() if k != "train_images_s"})
    if "fervit" in rows and "usual" in rows:
        rows["ratio"] = rows["fervit"]["train_images_s"] / rows["usual"]["train_images_s"]
    return rows


def _child(args: argparse.Namespace) -> dict:
    """Runs in the fresh process: load the data, time `args.steps` training steps once."""
    import torch

    from fervit.benchmark.measure import best_seconds
    from fervit.benchmark.pipelines import (ImageFiles, UsualBatches, usual_cpu_parts, usual_train_transform,
                                            usual_training)
    from fervit.benchmark.threads import _images_s
    from fervit.config import load_preset
    from fervit.data.dataset import load_fer

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    preset = load_preset(args.preset)
    preset.train.batch_size = args.batch_size
    data = load_fer(args.root, args.cache_dir, progress=False)
    train = torch.nonzero(data.folder == 0).flatten()
    if args.pipeline == "fervit":
        images, labels = data.images[train], data.labels[train]
        return {"train_images_s": _images_s(preset, images, labels, args.steps, args.warmup)}
    files = ImageFiles(args.root, [data.paths[i] for i in train.tolist()], data.labels[train].tolist(),
                       usual_train_transform(preset))
    model, optimizer, scheduler = usual_cpu_parts(preset, device)
    with UsualBatches(files, args.batch_size, args.workers, device, train=True) as usual:
        steps = usual_training(usual, model, model, optimizer, scheduler, preset, None)
        steps(max(args.warmup, 1))  # worker start-up is not timed
        seconds = best_seconds(lambda: steps(args.steps), 1, device)
    return {"train_images_s": args.batch_size * args.steps / seconds, "workers": args.workers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="the dataset folder (the Kaggle layout)")
    ap.add_argument("preset", nargs="?", default="cpu_cnn")
    ap.add_argument("--child", dest="pipeline", choices=("fervit", "usual"), help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="turns each pipeline takes; its best counts (default 3)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the usual pipeline's DataLoader workers")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache-dir")
    args = ap.parse_args()
    if args.pipeline:
        print(json.dumps(_child(args)))
        return 0
    rows = as_run_rows(args.root, args.preset, args.batch_size, args.steps, args.warmup, args.rounds, args.workers,
                       args.threads, args.cache_dir)
    for pipeline in ("fervit", "usual"):
        r = rows[pipeline]
        print(f"{pipeline:7s} {r['train_images_s']:8.1f} img/s (timings {', '.join(f'{t:.0f}' for t in r['timings'])}) "
              f"| threads wait: {r['omp_wait']}")
    print(f"fervit/usual {rows['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
