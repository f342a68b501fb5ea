"""`fervit` command line. Each module in this package adds one command family through
`add_parser(subparsers)`, which sets `func` on its parser; `main` finds them all."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings

from fervit import omp  # no torch

omp.choose(sys.argv[1:])  # before anything imports torch: a training run on an idle machine spins, all else sleeps

from fervit.errors import FervitError


# the README's "Data" rule in a few words (fervit.data.location.resolve_data_root applies it)
DATA_DEFAULT = "$FERVIT_DATA, else ./data/emotion_detection_fer, ../shared/data/emotion_detection_fer or where " \
               "`fervit data fetch` puts it, the first that exists"


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The dataset options every data-reading command shares."""
    p.add_argument("--data", help=f"dataset root (folder layout or fer2013.csv); default: {DATA_DEFAULT}")
    p.add_argument("--cache-dir", help="where the decoded tensor cache lives (default: $FERVIT_CACHE, else the user "
                                       "cache dir)")
    p.add_argument("--strict", action="store_true", help="fail on corrupt image files instead of skipping them")


# command-line flag (argparse dest) -> the config key it sets; a command offers any subset of these
FLAG_KEYS = {"data": "data.root", "cache_dir": "data.cache_dir", "protocol": "data.protocol",
             "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr", "output": "train.output",
             "device": "train.device", "seed": "train.seed"}


def flag_overrides(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """`section.key=value` overrides for the config flags given on the command line, then --set ones."""
    overrides = [f"{key}={getattr(args, dest)}" for dest, key in FLAG_KEYS.items()
                 if dest not in skip and getattr(args, dest, None) is not None]
    if getattr(args, "strict", False):
        overrides.append("data.strict=true")
    return overrides + list(getattr(args, "set", []))


class DefaultsFormatter(argparse.HelpFormatter):
    """--help states every option's default: appended where the help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default  # (0 == False: compare by identity and type, so a default 0 is still shown)
        if "default" in text.lower() or not action.option_strings or default is None or default is False \
                or (isinstance(default, (list, tuple)) and not default) or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """fervit's parsers: DefaultsFormatter everywhere (add_subparsers makes its children of this class too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from fervit import __version__

    parser = Parser(prog="fervit", description="Facial emotion recognition with Vision Transformers")
    parser.add_argument("--version", action="version", version=f"fervit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"fervit: warning: {msg}\n"
    try:
        return int(args.func(args) or 0)
    except FervitError as e:
        print(f"fervit: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2, or 128 + the signal that stopped a parent of jobs
    except KeyboardInterrupt:
        print("fervit: interrupted", file=sys.stderr)
        return 130
