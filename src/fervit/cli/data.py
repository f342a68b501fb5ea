"""`fervit data fetch`."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="dataset commands")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    f = dsub.add_parser("fetch", help="download the Kaggle emotion-detection-fer dataset with kagglehub")
    f.add_argument("--dest", default="data/emotion_detection_fer")
    f.set_defaults(func=run_fetch)
    return dsub


def run_fetch(args) -> int:
    from fervit.data.fetch import fetch

    print(fetch(args.dest))
    return 0
