"""`fervit predict clip.mp4` and `fervit predict --webcam`: the video half of `fervit predict`.

Each video (and a webcam session) gets a new folder NAME_emotions/ (never an existing one) holding
NAME.json, NAME.csv, NAME_annotated.mp4 and NAME_timeline.png; stdout gets a line per face track, or
the same JSON/CSV with --json/--csv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fervit.errors import FervitError

VIDEO_ONLY = ("every", "max_frames", "out")


def check_args(args, videos: list[str]) -> None:
    """One-line errors for a request that mixes photos and videos or gives video options to photos."""
    if args.webcam is not None and args.inputs:
        raise FervitError("--webcam reads the camera; give files in a separate command")
    if videos and len(videos) != len(args.inputs):
        raise FervitError(f"give videos ({videos[0]}) and photos in separate commands: their outputs differ "
                          "(a folder per video, a table of faces per photo)")
    if args.annotate:
        raise FervitError("--annotate is for photos; a video's annotated copy is always written into its folder "
                          "(choose where with --out)")
    if args.every < 1:
        raise FervitError(f"--every must be at least 1, got {args.every}")
    if args.max_frames is not None and args.max_frames < 1:
        raise FervitError(f"--max-frames must be at least 1, got {args.max_frames}")


def run_video(args) -> int:
    """Videos named on the command line, or the webcam; returns the exit status."""
    from fervit.inference.faces import ImageError
    from fervit.inference.predictor import Predictor
    from fervit.inference.frames import FrameReader, is_video, open_camera, open_video

    videos = [i for i in args.inputs if is_video(i)]
    check_args(args, videos)
    detect = "never" if args.no_detect else "always" if args.detect else "auto"
    live = args.webcam is not None
    capture = open_camera(args.webcam) if live else None  # no camera: say so before the model loads
    predictor = Predictor.load(args.model, args.backend, args.device, runs_dir=args.runs, tta=args.tta)
    base = Path(args.out) if args.out else Path(".")
    results, failed = [], 0
    sources = [(f"webcam{args.webcam}", capture)] if live else [(v, None) for v in videos]
    for name, capture in sources:
        try:
            capture = capture if live else open_video(name)
        except ImageError as e:
            print(f"fervit: {name}: {e}", file=sys.stderr)
            failed += 1
            continue
        reader = FrameReader(capture, args.every, live, args.max_frames)
        try:
            result, written = _one(predictor, name, reader, detect, args, base, live)
        finally:
            capture.release()
        results.append(result)
        if result.error or result.problem:
            print(f"fervit: {name}: {result.error or result.problem}", file=sys.stderr)
            failed += 1
        if not args.json and not args.csv:
            print(format_summary(result, predictor.classes, written))
    if args.json:
        print(json.dumps([r.to_dict(predictor.classes) for r in results], indent=1))
    elif args.csv:
        from fervit.inference.video_outputs import write_csv

        write_csv(results, predictor.classes, sys.stdout)
    if failed and not live:
        print(f"fervit: {failed} of {len(sources)} video(s) could not be read in full", file=sys.stderr)
    if any(r.interrupted for r in results) and not live:
        print("fervit: interrupted; the frames classified so far are written", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _one(predictor, name: str, reader, detect: str, args, base: Path, live: bool):
    """Classify one source into its new folder; (VideoResult, folder or None when nothing was decoded)."""
    from tqdm.auto import tqdm

    from fervit.inference.video import predict_frames
    from fervit.inference.video_outputs import AnnotatedVideo, output_dir, write_outputs

    folder = output_dir(base, name)
    stem = Path(name).stem
    annotated = AnnotatedVideo(folder / f"{stem}_annotated.mp4", reader.fps / reader.every if reader.fps else 0)
    live_out = sys.stderr if args.json or args.csv else sys.stdout

    def on_frame(frame, res):
        annotated.write(frame, res)
        if live:  # the webcam's answer, as it comes
            faces = "  ".join(f"#{t} {f.emotion} {f.probabilities[f.emotion]:.0%}" for t, f in zip(res.tracks, res.faces))
            print(f"{frame.time_s:7.2f}s  {faces or 'no face'}", file=live_out, flush=True)

    total = reader.declared // reader.every if reader.declared else None
    if args.max_frames and total:
        total = min(total, args.max_frames)
    show = not args.quiet and not live and sys.stderr.isatty()
    if live:
        which = "every frame" if args.every == 1 else f"1 frame in {args.every}"
        print(f"webcam {args.webcam}: classifying {which}; Ctrl-C stops and writes the results to {folder}/",
              file=sys.stderr)
    with tqdm(total=total, desc=Path(name).name, unit="frame", disable=not show, leave=False, file=sys.stderr) as bar:
        # the webcam answers each frame at once; a file is read `batch_size` frames per forward pass
        result = predict_frames(predictor, name, reader, detect, 1 if live else args.batch_size, on_frame, bar)
    video = annotated.close()
    if not result.frames and result.error:
        if not any(folder.iterdir()):  # nothing to show: leave no empty folder behind
            folder.rmdir()
        return result, None
    write_outputs(result, predictor.classes, folder)
    if video is None and result.frames:
        print(f"fervit: warning: {name}: OpenCV could not write the annotated MP4 (no mp4v encoder)", file=sys.stderr)
    return result, folder


def format_summary(result, classes: list[str], folder: Path | None) -> str:
    """A header line for the video, then one line per face track: when it is seen and its mean emotion."""
    seconds = result.decoded_frames / result.fps if result.fps else result.frames[-1].time_s if result.frames else 0
    duration = f"{seconds:.1f} s"
    fps = f" at {result.fps:g} fps" if result.fps else ""
    tracks = result.track_summary(classes)
    head = (f"{result.file}: {result.decoded_frames} frames{fps} ({duration}), {len(result.frames)} classified"
            f"{f' (1 in {result.every})' if result.every > 1 else ''}, {len(tracks)} face track"
            f"{'s' if len(tracks) != 1 else ''}" + (f" -> {folder}/" if folder else ""))
    if not tracks:
        return head + ("" if result.error else "\n  no face found (try --no-detect if the frames are face crops)")
    rows = [("track", "frames", "from", "to", "emotion (mean)", "runner-up")]
    for t in tracks:
        ranked = sorted(t["mean_probabilities"].items(), key=lambda kv: -kv[1])
        rows.append((f"#{t['track']}", str(t["frames"]), f"{t['first_s']:.2f}s", f"{t['last_s']:.2f}s",
                     f"{ranked[0][0]} {ranked[0][1]:.0%}", f"{ranked[1][0]} {ranked[1][1]:.0%}" if len(ranked) > 1 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join([head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows])
