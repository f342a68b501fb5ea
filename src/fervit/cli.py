"""`fervit` command line: every command reads a RunConfig and only overrides it."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from fervit.errors import FervitError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset root (folder layout or fer2013.csv); default $FERVIT_DATA "
                                  "or data/emotion_detection_fer")
    p.add_argument("--cache-dir", help="where the decoded tensor cache lives (default: the user cache dir)")
    p.add_argument("--strict", action="store_true", help="fail on corrupt image files instead of skipping them")


def build_parser() -> argparse.ArgumentParser:
    from fervit import __version__

    parser = argparse.ArgumentParser(prog="fervit", description="Facial emotion recognition with Vision Transformers")
    parser.add_argument("--version", action="version", version=f"fervit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and write a run folder")
    p.add_argument("--preset", default="vit_cnn", help="preset name or .json file (see `fervit presets`)")
    _add_data_args(p)
    p.add_argument("--protocol", choices=["seed", "fer2013"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--output", help="folder that receives the run folder (default runs/)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.depth=8 --set optim.ema_decay=0.999")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")

    p = sub.add_parser("evaluate", help="re-evaluate a saved model, regenerate its figures and results")
    p.add_argument("checkpoint", nargs="+", help="run folder or .safetensors checkpoint; several make an ensemble")
    p.add_argument("--split", choices=["val", "test"], default="test")
    _add_data_args(p)
    p.add_argument("--protocol", choices=["seed", "fer2013"])
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", action="store_true", help="average the prediction with the mirrored face's")
    p.add_argument("--output", help="where to write results (default: the run folder, or beside the checkpoint)")

    p = sub.add_parser("runs", help="table of all runs under a folder")
    p.add_argument("dir", nargs="?", default="runs")

    sub.add_parser("presets", help="list the shipped presets")

    p = sub.add_parser("data", help="dataset commands")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download the Kaggle emotion-detection-fer dataset with kagglehub")
    f.add_argument("--dest", default="data/emotion_detection_fer")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"fervit: warning: {msg}\n"
    try:
        return _dispatch(args)
    except FervitError as e:
        print(f"fervit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fervit: interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command == "train":
        return cmd_train(args)
    if args.command == "evaluate":
        from fervit.evaluation.rerun import evaluate_checkpoint

        out = evaluate_checkpoint(args.checkpoint, split=args.split, data_root=args.data, protocol=args.protocol,
                                  device=args.device, tta=args.tta, cache_dir=args.cache_dir, strict=args.strict,
                                  output=args.output)
        print(out)
        return 0
    if args.command == "runs":
        from fervit.runs import collect_runs, format_runs_table

        if not Path(args.dir).is_dir():
            raise FervitError(f"no run folder '{args.dir}'; train one with `fervit train` or name the folder")
        print(format_runs_table(collect_runs(args.dir)))
        return 0
    if args.command == "presets":
        from fervit.config import preset_names

        print("\n".join(preset_names()))
        return 0
    if args.command == "data":
        if args.data_command == "fetch":
            from fervit.data.fetch import fetch

            print(fetch(args.dest))
            return 0
    raise FervitError(f"unknown command {args.command}")


def cmd_train(args) -> int:
    from fervit.config import apply_overrides, load_preset
    from fervit.training.trainer import train

    cfg = load_preset(args.preset)
    direct = {"data.root": args.data, "data.cache_dir": args.cache_dir, "data.protocol": args.protocol,
              "train.epochs": args.epochs, "train.batch_size": args.batch_size, "optim.lr": args.lr,
              "train.output": args.output, "train.device": args.device, "train.seed": args.seed}
    overrides = [f"{k}={v}" for k, v in direct.items() if v is not None]
    if args.strict:
        overrides.append("data.strict=true")
    cfg = apply_overrides(cfg, overrides + args.set)
    run_dir = train(cfg, quiet=args.quiet)
    print(run_dir)
    return 0
