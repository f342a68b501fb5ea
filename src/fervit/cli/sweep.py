"""`fervit sweep`: an Optuna study over the configurations the original project tried by hand."""

from __future__ import annotations

import json
import sys

from fervit.cli import add_data_args, flag_overrides


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="hyperparameter sweep with Optuna; start several to share one study",
                       description="Run trials of an Optuna study that maximises validation accuracy. Every "
                                   "worker started with the same --study and --storage joins the same study.")
    p.add_argument("--preset", default="vit_cnn", help="the base config every trial starts from")
    add_data_args(p)
    p.add_argument("--protocol", choices=["seed", "fer2013"])
    p.add_argument("--epochs", type=int, help="epochs per trial")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config field for every trial, e.g. --set train.batch_size=256")
    p.add_argument("--study", default="fervit", help="study name (default fervit)")
    p.add_argument("--storage", help="SQLAlchemy URL of the study database, e.g. postgresql://user@host/db "
                                     "(default: SQLite at OUTPUT/STUDY/study.db)")
    p.add_argument("--output", default="runs/sweeps", help="trial run folders go to OUTPUT/STUDY/")
    p.add_argument("--trials", type=int, default=20, help="trials this worker runs (default 20)")
    p.add_argument("--max-study-trials", type=int, default=0,
                   help="stop once the whole study has this many finished trials (Slurm arrays)")
    p.add_argument("--timeout", type=float, default=0, help="start no trial after this many seconds")
    p.add_argument("--space", help="JSON search space replacing the default ({key: {choices}|{low, high, log}})")
    p.add_argument("--pruner", choices=["median", "none"], default="median",
                   help="median: stop a trial whose val accuracy is below the median of earlier trials")
    p.add_argument("--quiet", action="store_true", help="no line per trial")
    p.set_defaults(func=run_sweep_command)


def run_sweep_command(args) -> int:
    """Exit 0 when the trials ran, EXIT_REQUEUE (75) when a signal stopped the worker."""
    from fervit.config import apply_overrides, load_preset
    from fervit.sweep import load_space, run_sweep
    from fervit.training.resume import EXIT_REQUEUE, Preempted

    cfg = load_preset(args.preset)
    apply_overrides(cfg, flag_overrides(args, skip=("output",)))  # --output is where trials go, not a config key
    try:
        best = run_sweep(cfg, study_name=args.study, storage=args.storage, trials=args.trials,
                         max_study_trials=args.max_study_trials, timeout_s=args.timeout,
                         space=load_space(args.space), pruner=args.pruner, output=args.output, quiet=args.quiet)
    except Preempted as e:
        print(f"fervit: {e}; a stopped trial is queued again and resumes from its checkpoint", file=sys.stderr)
        return EXIT_REQUEUE
    print(json.dumps(best, indent=2))
    return 0
