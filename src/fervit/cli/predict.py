"""`fervit predict`: the emotion of every face in photos, as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

MODEL_HELP = ("run folder, .safetensors or .onnx file, or `last`: the newest finished run under --runs (default: the "
              "shipped model, else the newest run under ./runs)")
RUNS_HELP = "the folder `--model last` searches, like train's --output (default: %(default)s)"


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="detect faces in photos and videos and classify their emotion",
                       description="Classify every face in image files, folders (recursively) or stdin (-), in "
                                   "video files (a folder of results per video), or live from --webcam. "
                                   "Exit status 1 when some inputs could not be read.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image file, folder of images, - for stdin, or video file (.mp4, .avi, .mov, .mkv, ...)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--runs", default="runs", metavar="DIR", help=RUNS_HELP)
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="auto: ONNX Runtime for .onnx files and for the shipped model when the onnx extra is "
                        "installed (no torch import: a photo in under a second), else PyTorch; onnx: the export "
                        "beside the checkpoint")
    p.add_argument("--device", default="cpu", help="PyTorch device: cpu | cuda | auto")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON array, an object per image")
    fmt.add_argument("--csv", action="store_true", help="one CSV row per face (or per failed image)")
    det = p.add_mutually_exclusive_group()
    det.add_argument("--no-detect", action="store_true", help="classify each image whole: it is a face crop already")
    det.add_argument("--detect", action="store_true",
                     help="search for faces even in small images (default: images up to 128 px are face crops)")
    p.add_argument("--annotate", metavar="DIR", help="write copies with boxes and labels drawn into DIR (default: none)")
    p.add_argument("--batch-size", type=int, default=16, help="images decoded and classified together")
    p.add_argument("--tta", nargs="?", const="mirror", default="none", choices=["none", "mirror", "ten_crop"],
                   help="test-time augmentation: --tta (mirror) averages each face and its mirror; --tta ten_crop "
                        "the four corner and centre crops and their mirrors (models trained with model.crop_size)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no line naming the model")
    vid = p.add_argument_group("videos and webcam", "each video gets a new folder NAME_emotions/ with NAME.json, "
                               "NAME.csv (per frame: time, face track id, box, probabilities), NAME_annotated.mp4 "
                               "and NAME_timeline.png")
    vid.add_argument("--webcam", nargs="?", type=int, const=0, metavar="INDEX",
                     help="classify the camera's frames live (camera 0 unless INDEX) until Ctrl-C or --max-frames "
                          "(default: off)")
    vid.add_argument("--every", type=int, default=1, metavar="N", help="classify 1 frame in N (default: 1, every frame)")
    vid.add_argument("--max-frames", type=int, metavar="N", help="stop after N classified frames (default: no limit)")
    vid.add_argument("--out", metavar="DIR", help="where each video's folder is made (default: the current folder); "
                     "an existing folder is never reused: NAME_emotions_2/, ... follow")
    p.set_defaults(func=run_predict)


def run_predict(args) -> int:
    from fervit.errors import FervitError
    from fervit.inference.annotate import draw_faces, save_annotated
    from fervit.inference.predictor import Predictor, expand_inputs, model_line

    if args.batch_size < 1:
        raise FervitError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.inputs and args.webcam is None:
        raise FervitError("nothing to predict: give image or video files, a folder, - for stdin, or --webcam")
    from fervit.inference.frames import is_video

    if args.webcam is not None or any(is_video(i) for i in args.inputs):
        from fervit.cli.video import run_video

        return run_video(args)
    if args.every != 1 or args.max_frames is not None or args.out:
        raise FervitError("--every, --max-frames and --out are for videos and --webcam; photos take --annotate DIR")
    predictor = Predictor.load(args.model, args.backend, args.device, runs_dir=args.runs, tta=args.tta)
    sources = expand_inputs(args.inputs)
    if not sources:
        raise FervitError(f"no files found in {', '.join(args.inputs)}")
    detect = "never" if args.no_detect else "always" if args.detect else "auto"
    out_dir = Path(args.annotate) if args.annotate else None
    if out_dir is not None:
        inside = next((name for name, src in sources
                       if isinstance(src, Path) and src.parent.resolve() == out_dir.resolve()), None)
        if inside is not None:  # the copies would sit among (and be taken for) the photos they were drawn from
            raise FervitError(f"--annotate folder '{out_dir}' holds input photos (e.g. '{inside}'); name another "
                              "folder for the annotated copies")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise FervitError(f"--annotate needs a folder, and '{out_dir}' is a file; name a new or existing "
                              "folder") from None
        except OSError as e:
            raise FervitError(f"cannot make the --annotate folder '{out_dir}' ({e.strerror or e})") from None
    if not args.quiet:  # which model answered, once the request is known good (errors stay one line); on stderr,
        print(model_line(predictor.source, predictor.meta), file=sys.stderr)  # so --json / --csv stay clean
    show_bar = not args.quiet and len(sources) > args.batch_size and sys.stderr.isatty()
    results, used = [], set()
    for res in predictor.predict_sources(sources, detect, args.batch_size, show_bar, len(sources),
                                         keep_images=out_dir is not None):
        if out_dir is not None and res.image is not None:
            save_annotated(draw_faces(res.image, res.faces), out_dir, res.file, used)  # never over a file
            res.image = None  # free the decoded photo as soon as its copy is written
        results.append(res)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    elif args.csv:
        write_csv(results, predictor.classes, sys.stdout)
    else:
        print(format_table(results))
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"fervit: {failed} of {len(results)} input(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def write_csv(results, classes: list[str], out) -> None:
    """One row per face; an image without faces gets one row with empty face fields (and its error, if any)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "face", "x", "y", "w", "h", "emotion", *classes, "error"])
    for r in results:
        if not r.faces:
            writer.writerow([r.file, "", "", "", "", "", "", *[""] * len(classes),
                             r.error or "no face found"])
        for i, f in enumerate(r.faces, start=1):
            writer.writerow([r.file, i, *f.box.as_list(), f.emotion,
                             *(f"{f.probabilities[c]:.6f}" for c in classes), ""])


def format_table(results) -> str:
    """A fixed-width table: a line per face; an image with no face or an error gets a line saying so."""
    rows = []  # (file, face, box, emotion, runner-up) or (file, message)
    for r in results:
        if r.error is not None:
            rows.append((r.file, f"error: {r.error}"))
        elif not r.faces:
            rows.append((r.file, "no face found (try --no-detect if it is a face crop)"))
        for i, f in enumerate(r.faces, start=1):
            ranked = sorted(f.probabilities.items(), key=lambda kv: -kv[1])
            runner_up = f"{ranked[1][0]} {ranked[1][1]:.0%}" if len(ranked) > 1 else ""
            box = "whole image" if r.whole else "{} {} {}x{}".format(*f.box.as_list())
            rows.append((r.file, str(i), box, f"{ranked[0][0]} {ranked[0][1]:.0%}", runner_up))
    headers = ("file", "face", "box (x y wxh)", "emotion", "runner-up")
    widths = [max([len(h)] + [len(row[i]) for row in rows if len(row) == len(headers) or i == 0])
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
