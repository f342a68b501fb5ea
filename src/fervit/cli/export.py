"""`fervit export`: a trained model as ONNX, checked against PyTorch on real test faces."""

from __future__ import annotations

from fervit.cli import DATA_DEFAULT
from fervit.cli.predict import RUNS_HELP


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (dynamic batch) and check it against PyTorch",
                       description="Write MODEL.onnx beside the checkpoint (or --output), then compare ONNX Runtime "
                                   "with PyTorch on real FER-2013 test faces: probabilities must agree within "
                                   "1e-4 and accuracy must be identical.")
    p.add_argument("checkpoint", help="run folder or .safetensors checkpoint, or `last`: the newest finished run "
                                      "under --runs")
    p.add_argument("--runs", default="runs", metavar="DIR", help=RUNS_HELP)
    p.add_argument("--output", help="the .onnx file to write (default: beside the checkpoint)")
    p.add_argument("--data", help="FER-2013 folder whose test/ faces the check uses (default: the folder the run "
                                  f"trained on if it is still there, else {DATA_DEFAULT})")
    p.add_argument("--check-images", type=int, default=512, metavar="N",
                   help="test faces to compare on (0 skips the check)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    import sys

    from fervit.inference.onnx import export_checkpoint
    from fervit.inference.predictor import model_line, resolve_model
    from fervit.model_file import ModelFile, find_checkpoint

    weights = find_checkpoint(resolve_model(args.checkpoint, args.runs))
    path, report = export_checkpoint(weights, args.output, args.data, args.check_images, progress=True)
    # which model was exported, once it worked (a failure stays one line; the export takes seconds)
    print(model_line(weights, ModelFile.read(weights)), file=sys.stderr)
    print(f"wrote {path}")
    print(f"check: {report.summary()}" if report else "check skipped (--check-images 0)")
    return 0
