"""How OpenMP's idle threads wait, measured: the CPU preset's training step under each OMP_WAIT_POLICY (and
GOMP_SPINCOUNT), idle and beside one busy process, one fresh process per setting (OpenMP reads them once, when
torch loads). The figures behind `fervit.omp`'s choice (BENCHMARKS.md).

    python -m fervit.benchmark.wait_policy [--preset cpu_cnn] [--threads 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from fervit.benchmark.busy import busy_process

SETTINGS = {  # label -> environment
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "PASSIVE, GOMP_SPINCOUNT=100000": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "100000"},
    "PASSIVE, GOMP_SPINCOUNT=1000000": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000000"},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
}


def images_s(preset: str, threads: int, steps: int) -> float:
    """This process's best of two timings of `steps` training steps (after 3 warm-up steps)."""
    import torch

    from fervit.benchmark.threads import _images_s
    from fervit.config import load_preset

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4096, 48, 48), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 7, (4096,), generator=gen)
    return max(_images_s(load_preset(preset), images, labels, steps, 3) for _ in range(2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu_cnn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(images_s(args.preset, args.threads, args.steps))
        return 0
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    child = [sys.executable, "-m", "fervit.benchmark.wait_policy", "--child", "--preset", args.preset,
             "--threads", str(args.threads), "--steps", str(args.steps)]
    print(f"{args.preset}, {args.threads} threads, {args.steps} steps, best of 2 (img/s)")
    for busy in (False, True):
        with busy_process(busy):
            for label, env in SETTINGS.items():
                out = subprocess.run(child, env={**base, **env}, capture_output=True, text=True, check=True)
                print(f"  {'beside one busy process' if busy else 'idle':24s} {label:34s} {float(out.stdout):7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
