"""`fervit train` and `fervit presets`."""

from __future__ import annotations

from fervit.cli import add_data_args


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a run folder")
    p.add_argument("--preset", default="vit_cnn", help="preset name or .json file (see `fervit presets`)")
    add_data_args(p)
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
    p.set_defaults(func=run_train)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=run_presets)


def config_from_args(args):
    """The preset, then the direct flags, then --set overrides, in that order."""
    from fervit.config import apply_overrides, load_preset

    cfg = load_preset(args.preset)
    direct = {"data.root": args.data, "data.cache_dir": args.cache_dir, "data.protocol": args.protocol,
              "train.epochs": args.epochs, "train.batch_size": args.batch_size, "optim.lr": args.lr,
              "train.output": args.output, "train.device": args.device, "train.seed": args.seed}
    overrides = [f"{k}={v}" for k, v in direct.items() if v is not None]
    if args.strict:
        overrides.append("data.strict=true")
    return apply_overrides(cfg, overrides + args.set)


def run_train(args) -> int:
    from fervit.training.trainer import train

    print(train(config_from_args(args), quiet=args.quiet))
    return 0


def run_presets(args) -> int:
    from fervit.config import preset_names

    print("\n".join(preset_names()))
    return 0
