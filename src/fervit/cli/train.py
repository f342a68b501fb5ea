"""`fervit train` and `fervit presets`."""

from __future__ import annotations

import os
import sys

from fervit.cli import add_data_args, flag_overrides
from fervit.errors import FervitError


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a run folder")
    p.add_argument("--preset", help="preset name or .json file (see `fervit presets`; default vit_cnn)")
    add_data_args(p)
    p.add_argument("--protocol", choices=["seed", "fer2013"])
    p.add_argument("--epochs", type=int, help="epochs in all; with --resume, more than the run has done trains it "
                                              "further, also a finished run (the cosine re-plans to the new total)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--output", help="folder that receives the run folder (default runs/)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.depth=8 --set optim.ema_decay=0.999")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run exactly from its last checkpoint, with its own config "
                        "(only where/how-fast keys such as --data or --device, and --epochs, may change); refused "
                        "while another process trains into RUN_DIR")
    p.add_argument("--run-dir", metavar="DIR",
                   help="write the run into DIR; if DIR already holds this run, resume it (what a requeued "
                        "Slurm job needs: the same command line starts, then continues)")
    p.set_defaults(func=run_train)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=run_presets)


def config_from_args(args):
    """The preset (or the resumed run's config), then the direct flags, then --set overrides, in that order."""
    from fervit.config import apply_overrides, load_preset
    from fervit.training.resume import load_run_config

    if args.resume:
        if args.preset:
            raise FervitError("--resume continues a run with its own config; drop --preset")
        cfg = load_run_config(args.resume)
    else:
        cfg = load_preset(args.preset or "vit_cnn")
    return apply_overrides(cfg, flag_overrides(args))


def run_train(args) -> int:
    """Exit 0 when the run finished, EXIT_REQUEUE (75) when a signal stopped it after a checkpoint."""
    from pathlib import Path

    from fervit.training.resume import EXIT_REQUEUE, Preempted, check_config, load_run_config
    from fervit.training.trainer import train

    if args.resume and args.run_dir:
        raise FervitError("give either --resume RUN_DIR or --run-dir DIR, not both")
    cfg = config_from_args(args)
    run_dir = args.resume or args.run_dir
    resume = bool(args.resume) or (run_dir is not None and (Path(run_dir) / "config.json").is_file())
    if resume:  # fail fast, before any data is read
        check_config(load_run_config(run_dir).to_dict(), cfg, Path(run_dir))
    try:
        run = train(cfg, quiet=args.quiet, run_dir=run_dir, resume=resume)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"fervit: {e}", file=sys.stderr)
        return EXIT_REQUEUE
    if os.environ.get("RANK", "0") == "0":  # under torchrun/srun every rank returns; one line is enough
        print(run)
    return 0


def run_presets(args) -> int:
    from fervit.config import preset_names

    print("\n".join(preset_names()))
    return 0
