"""`fervit sweep`: an Optuna study over the configurations the original project tried by hand."""

from __future__ import annotations

import json
import sys

from fervit.cli import add_data_args, flag_overrides
from fervit.errors import FervitError


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="hyperparameter sweep with Optuna; start several to share one study",
                       description="Run trials of an Optuna study that maximises validation accuracy. Every "
                                   "worker started with the same --study and --storage joins the same study.")
    p.add_argument("--preset", default="vit_cnn", help="the base config every trial starts from")
    add_data_args(p)
    p.add_argument("--protocol", choices=["seed", "fer2013"],
                   help="seed: a seeded 90/10 split of train/ into train/val, test = test/; fer2013: Training / "
                        "PublicTest (val) / PrivateTest (test) (default: the preset's, seed)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the preset's)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the preset's, auto)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config field for every trial, e.g. --set train.batch_size=256 (repeatable; default: none)")
    p.add_argument("--study", default="fervit", help="study name (default fervit)")
    p.add_argument("--storage", help="SQLAlchemy URL of the study database, e.g. postgresql://user@host/db "
                                     "(default: SQLite at OUTPUT/STUDY/study.db)")
    p.add_argument("--output", default="runs/sweeps", help="trial run folders go to OUTPUT/STUDY/")
    p.add_argument("--trials", type=int, default=20, help="trials this worker runs (default 20)")
    p.add_argument("--max-study-trials", type=int, default=0,
                   help="stop once the whole study has this many finished trials (Slurm arrays; default 0: no limit)")
    p.add_argument("--timeout", type=float, default=0, help="start no trial after this many seconds (default 0: no limit)")
    p.add_argument("--space", help="JSON search space replacing the default ({key: {choices}|{low, high, log}})")
    p.add_argument("--pruner", choices=["median", "none"], default="median",
                   help="median: stop a trial whose val accuracy is below the median of earlier trials")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes on this machine sharing the study (and its one GPU); --trials is "
                        "split between them, each worker's log is OUTPUT/STUDY/worker<i>.log (default 1)")
    p.add_argument("--mps", choices=["auto", "on", "off"], default="auto",
                   help="CUDA MPS for --workers > 1: auto uses it when the machine has it")
    p.add_argument("--quiet", action="store_true", help="no line per trial")
    p.set_defaults(func=run_sweep_command)


def run_sweep_command(args) -> int:
    """Exit 0 when the trials ran, EXIT_REQUEUE (75) when a signal stopped the worker."""
    from fervit.config import apply_overrides, load_preset
    from fervit.sweep import check_space, load_space, run_sweep
    from fervit.training.signals import EXIT_REQUEUE, Preempted

    if args.workers < 1:
        raise FervitError(f"--workers must be at least 1, got {args.workers}")
    cfg = load_preset(args.preset)
    apply_overrides(cfg, flag_overrides(args, skip=("output",)))  # --output is where trials go, not a config key
    check_space(load_space(args.space), cfg)  # before the study or any worker exists
    if args.workers > 1:
        return run_sweep_workers(args)
    try:
        best = run_sweep(cfg, study_name=args.study, storage=args.storage, trials=args.trials,
                         max_study_trials=args.max_study_trials, timeout_s=args.timeout,
                         space=load_space(args.space), pruner=args.pruner, output=args.output, quiet=args.quiet)
    except Preempted as e:
        print(f"fervit: {e}; a stopped trial is queued again and resumes from its checkpoint", file=sys.stderr)
        return EXIT_REQUEUE
    print(json.dumps(best, indent=2))
    return 0


def worker_argv(args, trials: int) -> list[str]:
    """The `fervit sweep` command line of one worker: this command's options, its share of the trials."""
    argv = [sys.executable, "-m", "fervit", "sweep", "--preset", args.preset, "--study", args.study,
            "--output", args.output, "--trials", str(trials), "--pruner", args.pruner]
    for flag in ("data", "cache_dir", "protocol", "epochs", "device", "storage", "space"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    for flag in ("max_study_trials", "timeout"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.strict:
        argv.append("--strict")
    for item in args.set:
        argv += ["--set", item]
    return argv


def run_sweep_workers(args) -> int:
    """--workers N: N `fervit sweep` processes joining one study; prints the study's best when all are done."""
    from fervit.sweep import best_of, open_study, study_folder
    from fervit.launcher import Job, run_jobs, summary_lines

    folder, url = study_folder(args.output, args.study, args.storage)
    open_study(args.study, url, None)  # created once here, so the workers only join it
    shares = [args.trials // args.workers + (i < args.trials % args.workers) for i in range(args.workers)]
    jobs = [Job(f"worker{i}", worker_argv(args, n), folder / f"worker{i}.log") for i, n in enumerate(shares) if n]
    results = run_jobs(jobs, len(jobs), mps=args.mps, progress=None if args.quiet else sys.stderr)
    failed = [r for r in results if not r.ok]
    if failed:
        print("\n".join(summary_lines(failed)), file=sys.stderr)
    print(json.dumps(best_of(open_study(args.study, url, None)), indent=2))
    return 0 if not failed else 1
