"""`fervit train` and `fervit presets`."""

from __future__ import annotations

import os
import sys

from fervit.cli import add_data_args, flag_overrides
from fervit.errors import FervitError


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a run folder")
    p.add_argument("--preset", help="preset name or .json file (see `fervit presets`; default: cpu_cnn on a CPU, "
                                    "vit_cnn on a GPU)")
    add_data_args(p)
    p.add_argument("--protocol", choices=["seed", "fer2013"],
                   help="seed: a seeded 90/10 split of train/ into train/val, test = test/; fer2013: Training / "
                        "PublicTest (val) / PrivateTest (test) (default: the preset's, seed)")
    p.add_argument("--epochs", type=int, help="epochs in all; with --resume, more than the run has done trains it "
                                              "further, also a finished run (the cosine re-plans to the new total; default: the preset's)")
    p.add_argument("--batch-size", type=int, help="images per optimiser step (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate, reached after the warm-up (default: the preset's)")
    p.add_argument("--output", help="folder that receives the run folder (default runs/)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the preset's, auto: a GPU when there is "
                                    "one)")
    p.add_argument("--seed", type=int, help="seed of initialisation, shuffling and augmentation (default: the "
                                            "preset's, 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.depth=8 --set optim.ema_decay=0.999 "
                        "(repeatable; default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run exactly from its last checkpoint, with its own config "
                        "(only where/how-fast keys such as --data or --device, and --epochs, may change); refused "
                        "while another process trains into RUN_DIR (default: a new run)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="write the run into DIR; if DIR already holds this run, resume it (what a requeued "
                        "Slurm job needs: the same command line starts, then continues; default: a new folder under --output)")
    several = p.add_argument_group("several runs at once (each its own process, as if trained alone)")
    several.add_argument("--seeds", metavar="S1,S2,...", help="train the config once per seed, e.g. --seeds 0,1,2 (default: one run)")
    several.add_argument("--jobs", metavar="PLAN.json",
                         help='train the jobs of a plan: {"jobs": [{"name": ..., "preset": ..., "seed": ..., '
                              '"set": ["KEY=VALUE", ...]}]}; the other flags apply to every job (default: one run)')
    several.add_argument("--parallel", type=int, help="jobs running at the same time (default: all of them)")
    several.add_argument("--mps", choices=["auto", "on", "off"], default="auto",
                         help="CUDA MPS for the jobs: auto uses it when the machine has it (default auto)")
    p.set_defaults(func=run_train)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=run_presets)


def config_from_args(args):
    """The preset (or the resumed run's config), then the direct flags, then --set overrides, in that order."""
    from fervit.config import apply_overrides, load_preset
    from fervit.run_folder import config_to_resume as load_run_config

    if args.resume:
        if args.preset:
            raise FervitError("--resume continues a run with its own config; drop --preset")
        cfg = load_run_config(args.resume)
    else:
        name = args.preset or default_preset(args.device)
        cfg = load_preset(name)
    return apply_overrides(cfg, flag_overrides(args))


def default_preset(device: str | None) -> str:
    """The preset `fervit train` trains without --preset: cpu_cnn on a CPU, vit_cnn on a GPU. Says which on stdout.

    On a CPU vit_cnn's 145 tokens cost 32 minutes an epoch on two cores; of the two CPU-shaped models, the VGG stem
    alone (cpu_cnn) beat the stem with two transformer blocks (cpu) in equal two-hour runs (RESULTS.md)."""
    import torch

    on_gpu = (device or "auto").startswith("cuda") or ((device or "auto") == "auto" and torch.cuda.is_available())
    name = "vit_cnn" if on_gpu else "cpu_cnn"
    if os.environ.get("RANK", "0") == "0":
        print(f"fervit train: no --preset, so {name} ({'a GPU' if on_gpu else 'no GPU'} here"
              + ("" if on_gpu else "; vit_vgg's VGG stem alone, which beat it with two transformer blocks "
                                   "(--preset cpu) on a CPU; 1-2 minutes an epoch on 2 cores; --preset cpu_fast "
                                   "trains in under 20 minutes") + ")")  # stdout, with the run's log: errors stay one line
    return name


def run_train(args) -> int:
    """Exit 0 when the run finished, EXIT_REQUEUE (75) when a signal stopped it after a checkpoint."""
    from fervit.run_folder import is_run_folder
    from fervit.training.signals import EXIT_REQUEUE, Preempted
    from fervit.training.trainer import train

    if args.resume and args.run_dir:
        raise FervitError("give either --resume RUN_DIR or --run-dir DIR, not both")
    if args.seeds or args.jobs:
        return run_train_jobs(args)
    if args.parallel is not None:
        raise FervitError("--parallel sets how many of --seeds or --jobs run at once; give one of them")
    cfg = config_from_args(args)
    run_dir = args.resume or args.run_dir
    resume = bool(args.resume) or (run_dir is not None and is_run_folder(run_dir))
    try:  # train() checks the folder's lock and recipe before it reads any data
        run = train(cfg, quiet=args.quiet, run_dir=run_dir, resume=resume)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"fervit: {e}", file=sys.stderr)
        return EXIT_REQUEUE
    if os.environ.get("RANK", "0") == "0":  # under torchrun/srun every rank returns; one line is enough
        print(run)
    return 0


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FervitError(f"--seeds takes comma-separated integers such as 0,1,2, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FervitError(f"--seeds needs distinct integers such as 0,1,2, got '{text}'")
    return seeds


def read_plan(path: str) -> list[dict]:
    """The jobs of a plan file, checked: each has a unique name, and only known keys."""
    import json
    from pathlib import Path

    try:
        plan = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FervitError(f"plan '{path}' does not exist") from None
    except IsADirectoryError:
        raise FervitError(f"plan '{path}' is a folder; give the plan's .json file") from None
    except OSError as e:
        raise FervitError(f"cannot read plan '{path}' ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise FervitError(f"plan '{path}' is not UTF-8 text (binary, or another encoding such as Latin-1); a plan is "
                          "a JSON file") from None
    except json.JSONDecodeError as e:
        raise FervitError(f"plan '{path}' is not valid JSON: {e}") from None
    except RecursionError:
        raise FervitError(f"plan '{path}' is nested too deeply to be a plan") from None
    jobs = plan.get("jobs") if isinstance(plan, dict) else None
    if not isinstance(jobs, list) or not jobs:
        raise FervitError(f"plan '{path}' needs a non-empty \"jobs\" list of "
                          '{"name": ..., "preset": ..., "set": [...]}')
    names = []
    for i, job in enumerate(jobs):
        if not isinstance(job, dict) or not isinstance(job.get("name"), str) or not job["name"]:
            raise FervitError(f"plan '{path}': job {i + 1} needs a \"name\"")
        unknown = set(job) - {"name", "preset", "seed", "set", "budget", "protocol"}
        if unknown:
            raise FervitError(f"plan '{path}': job '{job['name']}' has unknown keys {sorted(unknown)}")
        if not all(c.isalnum() or c in "-_." for c in job["name"]):
            raise FervitError(f"plan '{path}': job name '{job['name']}' must be letters, digits, - _ or . only")
        if set(job["name"]) == {"."}:  # `..` trained into --output itself, `.` into the plan's group folder
            raise FervitError(f"plan '{path}': job name '{job['name']}' is not a folder name (each job trains into "
                              "a folder of its name); give it letters or digits")
        for key, kind in (("preset", "a preset name or .json file"), ("protocol", "seed or fer2013")):
            if key in job and not (isinstance(job[key], str) and job[key]):
                raise FervitError(f"plan '{path}': job '{job['name']}': \"{key}\" must be {kind}, got "
                                  f"{json.dumps(job[key])}")
        if "set" in job and not (isinstance(job["set"], list) and all(isinstance(s, str) for s in job["set"])):
            raise FervitError(f"plan '{path}': job '{job['name']}': \"set\" must be a list of \"KEY=VALUE\" strings, "
                              f"got {json.dumps(job['set'])}")
        for key in ("seed", "budget"):
            if key in job and (isinstance(job[key], bool) or not isinstance(job[key], (int, float) if key == "budget"
                                                                           else int)):
                raise FervitError(f"plan '{path}': job '{job['name']}': \"{key}\" must be a number, got "
                                  f"{json.dumps(job[key])}")
        names.append(job["name"])
    if len(set(names)) != len(names):
        raise FervitError(f"plan '{path}': job names must be unique")
    return jobs


def job_train_args(args, preset: str | None, seed: int | None, extra_set: list[str]) -> list[str]:
    """`fervit train` flags for one job: the shared flags of this command, then the job's own."""
    out = ["--preset", preset] if preset else []
    if seed is not None:
        out += ["--seed", str(seed)]
    # the shared flags as the overrides `fervit train` makes of them (each job gets its own folder and seed)
    for item in [*flag_overrides(args, skip=("output", "seed")), *extra_set]:
        out += ["--set", item]
    return out


def run_train_jobs(args) -> int:
    """--seeds / --jobs: one `fervit train` process per job under OUTPUT/<time>_<what>/<job>/; exit 1 when a
    job failed (each failure is one line; finished jobs keep their run folders)."""
    import time
    from pathlib import Path

    from fervit.launcher import run_jobs, summary_lines, train_job

    if args.seeds and args.jobs:
        raise FervitError("give either --seeds or --jobs, not both")
    if args.parallel is not None and args.parallel < 1:  # before anything is written or printed
        raise FervitError(f"--parallel must be at least 1, got {args.parallel}")
    if args.resume or args.run_dir:
        raise FervitError("--seeds and --jobs make one run folder per job; drop --resume/--run-dir")
    if args.seed is not None and args.seeds:
        raise FervitError("give either --seed or --seeds, not both")
    if args.seeds:
        specs = [{"name": f"seed{s}", "preset": args.preset, "seed": s, "set": []} for s in parse_seeds(args.seeds)]
        label = f"{Path(args.preset or 'default').stem}_seeds"
    else:
        specs = [{"preset": args.preset, "seed": args.seed, "set": [], **job} for job in read_plan(args.jobs)]
        for job in specs:
            if "budget" in job:
                job["set"] = [*job["set"], f"train.time_budget_s={job['budget']}"]
            if "protocol" in job:
                job["set"] = [*job["set"], f"data.protocol={job['protocol']}"]
        label = Path(args.jobs).stem
    train_args = {job["name"]: job_train_args(args, job["preset"], job["seed"], job["set"]) for job in specs}
    from fervit.cli import build_parser

    for name, argv in train_args.items():  # a bad preset or --set fails now, before any process starts
        try:
            config_from_args(build_parser().parse_args(["train", *argv]))
        except FervitError as e:
            raise FervitError(f"job '{name}': {e}") from None
    group = Path(args.output or "runs") / f"{time.strftime('%Y%m%d_%H%M%S')}_{label}"
    n = 2
    while group.exists():
        group, n = group.with_name(f"{group.name.rsplit('~', 1)[0]}~{n}"), n + 1
    from fervit.io import make_folder

    make_folder(group)  # a read-only --output is one line here, before any job starts
    jobs = [train_job(name, argv, group / name) for name, argv in train_args.items()]
    parallel = args.parallel or len(jobs)
    print(f"{len(jobs)} jobs, {min(parallel, len(jobs))} at a time, under {group}", file=sys.stderr)
    results = run_jobs(jobs, parallel, mps=args.mps, progress=None if args.quiet else sys.stderr)
    print("\n".join(summary_lines(results)))
    return 0 if all(r.ok for r in results) else 1


def run_presets(args) -> int:
    from fervit.config import preset_names

    print("\n".join(preset_names()))
    return 0
