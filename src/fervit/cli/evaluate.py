"""`fervit evaluate` and `fervit runs`."""

from __future__ import annotations

from pathlib import Path

from fervit.cli import add_data_args
from fervit.cli.predict import RUNS_HELP
from fervit.errors import FervitError


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="re-evaluate a saved model, regenerate its figures and results")
    p.add_argument("checkpoint", nargs="*", help="run folder or .safetensors checkpoint, or `last`: the newest "
                   "finished run under --runs; several make an ensemble (default: the shipped model, else the newest "
                   "run under ./runs)")
    p.add_argument("--runs", default="runs", metavar="DIR", help=RUNS_HELP)
    p.add_argument("--split", choices=["val", "test"], default="test", help="the split to score")
    add_data_args(p)
    p.add_argument("--protocol", choices=["seed", "fer2013"],
                   help="seed: a seeded 90/10 split of train/ into train/val, test = test/; fer2013: Training / "
                        "PublicTest (val) / PrivateTest (test) (default: the one the model was trained with)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: a GPU when there is one)")
    p.add_argument("--tta", nargs="?", const="mirror", default="none", choices=["none", "mirror", "ten_crop"],
                   help="test-time augmentation: --tta (mirror) averages the face and its mirror; --tta ten_crop "
                        "the four corner and centre crops and their mirrors (models trained with model.crop_size)")
    p.add_argument("--output", help="where to write results (default: the run folder; for the shipped model "
                   "runs/shipped_model)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit the temperature that calibrates the probabilities on the validation split (PublicTest "
                        "under fer2013), write it into the model file, and report the ECE before and after with a "
                        "reliability diagram (for runs trained before fervit did this itself)")
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("runs", help="table of all runs under a folder")
    p.add_argument("dir", nargs="?", default="runs", help="folder searched (recursively) for run folders "
                                                          "(default: %(default)s)")
    p.set_defaults(func=run_runs)


def run_evaluate(args) -> int:
    from fervit.evaluation.rerun import evaluate_checkpoint
    import sys

    from fervit.inference.predictor import model_line, resolve_model, shipped_model

    checkpoints = [str(resolve_model(c, args.runs)) for c in args.checkpoint or [None]]
    output = args.output
    if not args.checkpoint and Path(checkpoints[0]) == shipped_model():
        output = output or "runs/shipped_model"  # never into the installed package
    if args.calibrate and shipped_model() is not None and \
            Path(checkpoints[0]).expanduser().resolve() == shipped_model().resolve():
        raise FervitError("--calibrate writes into the model file, and the shipped model is part of the installed "
                          "package; give a run folder (or a copy of the shipped model)")
    print(evaluate_checkpoint(checkpoints, split=args.split, data_root=args.data, protocol=args.protocol,
                              device=args.device, tta=args.tta, cache_dir=args.cache_dir, strict=args.strict,
                              output=output, calibrate=args.calibrate,
                              announce=lambda w, meta: print(model_line(w, meta), file=sys.stderr, flush=True),
                              progress=True))
    return 0


def run_runs(args) -> int:
    from fervit.runs import collect_runs, format_runs_table

    if not Path(args.dir).is_dir():
        raise FervitError(f"no run folder '{args.dir}'; train one with `fervit train` or name the folder")
    print(format_runs_table(collect_runs(args.dir)))
    return 0
