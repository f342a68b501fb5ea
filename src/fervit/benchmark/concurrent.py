"""Aggregate training throughput of N models trained at once, each in its own process on one device.

The processes are started by `fervit.launcher.run_jobs` (the launcher of `fervit train --seeds`,
under CUDA MPS where the machine has it). Each builds its model and `TrainStep`, warms up (compilation,
CUDA graph capture), then waits at a file barrier until every process is warm, so that the timed windows
overlap; aggregate img/s = all images / (last end - first start). Images are random uint8 faces resident on
the device: the step's cost does not depend on pixel values, and no process spends time decoding.

    python -m fervit.benchmark.concurrent --preset vit_cnn --device cuda --batch-size 128 --steps 200 \\
        --mode cuda_graph --barrier DIR --processes 4 --out DIR/worker0.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fervit.errors import FervitError

BARRIER_TIMEOUT_S = 240.0  # a process that never gets ready (a failed start) must not hold the others


def measure_concurrency(preset: str, counts: tuple[int, ...], *, device: str, batch_size: int, steps: int,
                        warmup: int, mode: str, folder: Path, images: int = 4096, threads: int = 0,
                        compile_backend: str = "inductor", mps: str = "auto", timeout_s: float = 300) -> list[dict]:
    """One row per process count: aggregate and per-process training img/s, speed-up over one process.
    A process count whose processes fail or outlive `timeout_s` gets a row with its one-line error."""
    from fervit.launcher import Job, mps_available, run_jobs

    rows = []
    for n in counts:
        run = folder / f"x{n}"
        (run / "barrier").mkdir(parents=True, exist_ok=True)
        jobs = []
        for i in range(n):
            cmd = [sys.executable, "-m", "fervit.benchmark.concurrent", "--preset", preset, "--device", device,
                   "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup), "--mode", mode,
                   "--images", str(images), "--threads", str(threads), "--compile-backend", compile_backend,
                   "--barrier", str(run / "barrier"), "--processes", str(n), "--seed", str(i),
                   "--out", str(run / f"worker{i}.json")]
            # n processes compiling at once share the CPUs instead of each starting a worker per CPU
            env = {"TORCHINDUCTOR_COMPILE_THREADS": str(max((os.cpu_count() or 1) // n, 1))}
            jobs.append(Job(f"x{n}.{i}", cmd, run / f"worker{i}.log", env=env))
        results = run_jobs(jobs, parallel=n, mps=mps, progress=None, timeout_s=timeout_s)
        failed = [r for r in results if not r.ok]
        row = {"processes": n, "mps": mps != "off" and n > 1 and mps_available()}
        if failed:
            row["error"] = f"{failed[0].name}: {failed[0].error}"
            rows.append(row)
            continue
        reports = [json.loads((run / f"worker{i}.json").read_text()) for i in range(n)]
        window = max(r["t1"] for r in reports) - min(r["t0"] for r in reports)
        row.update({"images_s": sum(r["images"] for r in reports) / window,
                    "per_process_images_s": [r["images"] / (r["t1"] - r["t0"]) for r in reports],
                    "mode_used": sorted({r["mode_used"] for r in reports})})
        rows.append(row)
    single = next((r["images_s"] for r in rows if r["processes"] == 1 and "images_s" in r), None)
    for r in rows:
        if single and "images_s" in r:
            r["x_one"] = r["images_s"] / single
    return rows


def wait_for_all(barrier: Path, processes: int, me: int) -> None:
    """Mark this process ready, then wait until all `processes` are."""
    (barrier / f"ready{me}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(barrier.glob("ready*"))) < processes:
        if time.monotonic() > deadline:
            raise FervitError(f"the other benchmark processes were not ready after {BARRIER_TIMEOUT_S:.0f}s; "
                              f"see the logs beside {barrier}")
        time.sleep(0.005)


def worker(args) -> dict:
    import torch

    from fervit.benchmark.measure import sync
    from fervit.config import apply_overrides, load_preset
    from fervit.models import build_model
    from fervit.training.step import TrainStep
    from fervit.device import resolve_amp, resolve_device
    from fervit.training.parts import build_optimizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = apply_overrides(load_preset(args.preset), [f"train.batch_size={args.batch_size}"])
    torch.manual_seed(args.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = TrainStep(model, optimizer, scheduler, cfg, amp_dtype=resolve_amp("auto", device), mode=args.mode,
                     compile_backend=args.compile_backend)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images = torch.randint(0, 256, (args.images, cfg.model.img_size, cfg.model.img_size), dtype=torch.uint8,
                           device=device, generator=gen)
    labels = torch.randint(0, cfg.model.num_classes, (args.images,), device=device, generator=gen)

    def run(k: int) -> None:
        for _ in range(k):
            idx = torch.randint(0, args.images, (args.batch_size,), device=device, generator=gen)
            step(images[idx], labels[idx], gen)

    run(args.warmup)
    sync(device)
    wait_for_all(Path(args.barrier), args.processes, args.seed)
    t0 = time.time()
    run(args.steps)
    sync(device)
    t1 = time.time()
    return {"t0": t0, "t1": t1, "images": args.steps * args.batch_size, "mode_used": step.mode_used}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one process of the bench's concurrent-training rows")
    p.add_argument("--preset", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", default="eager")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--barrier", required=True)
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        result = worker(args)
    except FervitError as e:
        print(f"fervit: error: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does; torch is imported later
    raise SystemExit(main())
