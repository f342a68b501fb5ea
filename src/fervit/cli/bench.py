"""`fervit bench`."""

from __future__ import annotations

import shlex
from pathlib import Path

from fervit.cli import add_data_args
from fervit.errors import FervitError


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time fervit's training pipeline beside the usual per-image one",
                       description="Time training, evaluation, latency and the data path alone for fervit's "
                                   "device-side pipeline and the usual PIL + torchvision DataLoader pipeline, "
                                   "same model, same machine; print one table.")
    add_data_args(p)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI, numbers only indicative")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here (default: only the table)")
    p.add_argument("--models", nargs="+", metavar="PRESET", help="presets to time (default vit_cnn vit_patch)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, help="training batch size for both pipelines (default 128)")
    p.add_argument("--steps", type=int, help="optimiser steps per training timing (default: one epoch on CUDA, "
                                             "20 on CPU)")
    p.add_argument("--data-images", type=int, help="images per data-path timing (default: one epoch on CUDA)")
    p.add_argument("--eval-images", type=int, help="test images per evaluation timing (default: all on CUDA)")
    p.add_argument("--repeats", type=int, help="timings per figure; the best one counts (default 3; quick 2)")
    p.add_argument("--workers", type=int, help="DataLoader workers of the usual pipeline (default: CPU count)")
    p.add_argument("--compile", choices=["auto", "on", "off"], help="torch.compile the model (default auto: CUDA only)")
    p.add_argument("--few-workers", type=int, help="the usual pipeline is also timed with this many workers "
                                                   "(default 4, a typical Slurm CPU share per GPU)")
    p.add_argument("--step-model", metavar="PRESET", help="model of the step-mode and concurrency rows "
                                                          "(default: the first of --models)")
    p.add_argument("--step-modes", nargs="+", choices=["eager", "compile", "cuda_graph"],
                   help="training step modes to time (default all three)")
    p.add_argument("--step-batches", nargs="+", type=int, metavar="B",
                   help="batch sizes of the step-mode rows (default: --batch-size x 1, 2 and 4)")
    p.add_argument("--concurrency", nargs="*", type=int, metavar="N",
                   help="models trained at once, one process each (default 1 2 4 8; quick 1 2; none: skip)")
    p.add_argument("--concurrency-steps", type=int, help="timed steps per process in the concurrency rows (default: --steps, or 200 when that is a whole epoch)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_bench)


def command_line(args) -> str:
    """The command as the user would type it, rebuilt from the parsed options (tests call main(argv))."""
    parts = ["fervit", "bench"]
    for flag in ("quick", "strict", "quiet"):
        if getattr(args, flag):
            parts.append(f"--{flag}")
    for flag in ("data", "cache_dir", "json", "device", "batch_size", "steps", "data_images", "eval_images",
                 "repeats", "workers", "compile", "few_workers", "step_model", "concurrency_steps"):
        value = getattr(args, flag)
        if value is not None and not (flag == "device" and value == "auto"):
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    for flag in ("models", "step_modes", "step_batches", "concurrency"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", *map(str, value)]
    return shlex.join(parts)


def run_bench(args) -> int:
    from fervit.benchmark.config import bench_config
    from fervit.benchmark.run import run_benchmark
    from fervit.benchmark.table import format_table
    from fervit.data.location import resolve_data_root
    from fervit.io import write_json
    from fervit.device import resolve_device

    if args.json and not Path(args.json).expanduser().parent.is_dir():
        raise FervitError(f"the folder for --json '{args.json}' does not exist; create it or pick another path")
    device = resolve_device(args.device)
    cfg = bench_config(device, args.quick, models=args.models, batch_size=args.batch_size,
                       train_steps=args.steps, data_images=args.data_images, eval_images=args.eval_images,
                       repeats=args.repeats, workers=args.workers, compile=args.compile,
                       few_workers=args.few_workers, step_model=args.step_model, step_modes=args.step_modes,
                       step_batches=args.step_batches, concurrency=args.concurrency,
                       concurrency_steps=args.concurrency_steps)
    json_path = Path(args.json).expanduser() if args.json else None

    def write_partial(result: dict) -> None:  # a run cut short by a time limit keeps what it measured
        if json_path is not None:
            write_json(json_path, {**result, "partial": True})

    result = run_benchmark(resolve_data_root(args.data), cfg, device, cache_dir=args.cache_dir, strict=args.strict,
                           progress=not args.quiet, command=command_line(args), on_partial=write_partial)
    result["table"] = format_table(result)
    print(result["table"])
    if json_path is not None:
        write_json(json_path, result)
    return 0
