"""Training img/s on a CPU with each pipeline in a fresh process, under the OpenMP wait policy it really runs with.

OpenMP reads OMP_WAIT_POLICY once, when torch loads, so one bench process cannot time both pipelines under
their own policies. `fervit bench` itself sleeps (PASSIVE, as every command but a training run does), which
understates `fervit train`: a single run on an idle machine spins (`fervit.omp`), 29-54% faster on the 2-core
machine. And a user's script sets nothing, so OpenMP's default applies to it. This section gives both:
- fervit: the trainer's `TrainStep` on the train/ images, under the policy `fervit train` would choose now;
- usual: the per-image DataLoader pipeline in fp32 NCHW (`benchmark.pipelines`), with the wait-policy variables
  fervit set removed from its environment.

    python -m fervit.benchmark.as_run --child fervit|usual ROOT PRESET ...  (what `run_benchmark` starts)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from fervit import omp
from fervit.errors import FervitError

OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def environments() -> dict[str, tuple[dict, str]]:
    """pipeline -> (its environment, how its threads wait) for the two child processes."""
    user = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES or not omp.set_by_fervit(k)}
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


def as_run_rows(root: str, preset: str, batch_size: int, steps: int, warmup: int, repeats: int, workers: int,
                threads: int, cache_dir: str | None, pipelines: tuple[str, ...] = ("fervit", "usual")) -> dict:
    """{pipeline: {"train_images_s", "omp_wait"}} and, with both, "ratio": each timed in a fresh process."""
    rows: dict = {}
    for pipeline, (env, wait) in environments().items():
        if pipeline not in pipelines:
            continue
        cmd = [sys.executable, "-m", "fervit.benchmark.as_run", "--child", pipeline, str(root), preset,
               "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup),
               "--repeats", str(repeats), "--workers", str(workers), "--threads", str(threads)]
        if cache_dir:
            cmd += ["--cache-dir", str(cache_dir)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise FervitError(f"the bench's fresh {pipeline} process failed: {last}")
        rows[pipeline] = {**json.loads(done.stdout.strip().splitlines()[-1]), "omp_wait": wait,
                          "batch_size": batch_size, "steps": steps}
    if "fervit" in rows and "usual" in rows:
        rows["ratio"] = rows["fervit"]["train_images_s"] / rows["usual"]["train_images_s"]
    return rows


def _child(args: argparse.Namespace) -> dict:
    """Runs in the fresh process: load the data, time `args.steps` training steps, best of `args.repeats`."""
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
        best = max(_images_s(preset, images, labels, args.steps, args.warmup) for _ in range(args.repeats))
        return {"train_images_s": best}
    files = ImageFiles(args.root, [data.paths[i] for i in train.tolist()], data.labels[train].tolist(),
                       usual_train_transform(preset.augment))
    model, optimizer, scheduler = usual_cpu_parts(preset, device)
    with UsualBatches(files, args.batch_size, args.workers, device, train=True) as usual:
        steps = usual_training(usual, model, model, optimizer, scheduler, preset, None)
        steps(max(args.warmup, 1))  # worker start-up is not timed
        seconds = best_seconds(lambda: steps(args.steps), args.repeats, device)
    return {"train_images_s": args.batch_size * args.steps / seconds, "workers": args.workers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", dest="pipeline", choices=("fervit", "usual"), required=True)
    ap.add_argument("root")
    ap.add_argument("preset")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir")
    print(json.dumps(_child(ap.parse_args())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
