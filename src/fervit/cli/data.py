"""`fervit data fetch` and `fervit data audit`."""

from __future__ import annotations

from fervit.cli import DATA_DEFAULT, add_data_args
from fervit.data.location import fetch_folder


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="dataset commands: fetch, audit")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    f = dsub.add_parser("fetch", help="download the Kaggle emotion-detection-fer dataset with kagglehub")
    f.add_argument("--dest", help="folder to put train/ and test/ into (default: the user data folder, "
                                  f"{fetch_folder()}, where every command looks for the data)")
    f.set_defaults(func=run_fetch)
    a = dsub.add_parser("audit", help="report duplicates, label conflicts and blank frames")
    a.add_argument("root", nargs="?", help=f"dataset root (default: --data, else {DATA_DEFAULT})")
    add_data_args(a)
    a.add_argument("--json", metavar="PATH", help="also write the full report as JSON (default: only the summary)")
    a.set_defaults(func=run_audit)


def run_fetch(args) -> int:
    from fervit.data.fetch import fetch

    print(fetch(args.dest or fetch_folder()))
    return 0


def run_audit(args) -> int:
    from fervit.data.location import resolve_data_root
    from fervit.data.audit import audit, format_audit
    from fervit.data.dataset import load_fer
    from fervit.io import write_json

    data = load_fer(resolve_data_root(args.root or args.data or ""), args.cache_dir, args.strict)
    report = audit(data, progress=True)
    print(format_audit(report))
    if args.json:
        write_json(args.json, report)
    return 0
