"""Inference speed on the CPU: eager PyTorch vs ONNX Runtime, batch-1 latency and batched throughput.

    python -m fervit.benchmark.inference_speed [--threads 2] [--model RUN_DIR ...] [--photo PHOTO.jpg]
    python -m fervit.benchmark.inference_speed --user-waits --photo PHOTO.jpg [--model A --model B] [--data ROOT]

`--user-waits` times what a user waits for, per model: one FER face and one photo (the tests' three-face
demo photo: `python tests/photo.py three_faces.jpg`) through the `fervit predict` command (a fresh process
each time: start-up, model load, detection, forward) and through `fervit serve`'s API (the app in process, one request after another). Without --model it
compares nothing but the shipped model.

Without --model it times both architectures at their preset sizes (vit_cnn.json, vit_patch.json, and
small.json) with random weights: speed does not depend on the weight values. Prints a Markdown table for
BENCHMARKS.md. Needs the onnx extra; the pipeline rows need the detect extra.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads steal the
# cores the other thread needs (PyTorch's bs=1 median was 5-10x its fastest run). Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from fervit.benchmark.measure import cpu_name  # noqa: E402


def latency_ms(fn, x, warmup: int, runs: int) -> tuple[float, float]:
    """Median and fastest wall time of fn(x), in milliseconds (on a shared machine the fastest run is the
    best estimate of the uncontended speed; the median shows what a user sees under that load)."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def throughput(fn, x, seconds: float) -> tuple[float, float]:
    """Images per second over at least `seconds` of back-to-back batches (after one warm-up batch):
    the overall rate and the fastest single batch's rate."""
    fn(x)
    n, t0, best = 0, time.perf_counter(), float("inf")
    while time.perf_counter() - t0 < seconds:
        t1 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t1)
        n += len(x)
    return n / (time.perf_counter() - t0), len(x) / best


def load_average() -> str:
    """The 1-minute load average: other processes on a shared CPU skew every number here."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def models_to_time(paths: list[str]):
    """(label, model, meta): the given checkpoints, or both architectures at their preset sizes."""
    from fervit.config import load_preset, preset_names
    from fervit.models import build_model, count_parameters
    from fervit.models.checkpoint import describe, load_model

    if paths:
        for p in paths:
            model, meta = load_model(p, "cpu")
            yield f"{meta.model.name} ({Path(p).name}, {count_parameters(model) / 1e6:.2f}M)", model, meta
        return
    for preset in ("vit_cnn", "vit_patch", "small"):
        if preset not in preset_names():
            continue
        cfg = load_preset(preset).model
        model = build_model(cfg).eval()
        meta = describe(cfg)
        yield f"{cfg.name}, {preset} preset ({count_parameters(model) / 1e6:.2f}M params)", model, meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="run folder or checkpoint (repeatable)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for both runtimes")
    ap.add_argument("--batch", type=int, default=64, help="batch size for the throughput column")
    ap.add_argument("--runs", type=int, default=200, help="timed batch-1 calls per backend")
    ap.add_argument("--seconds", type=float, default=4.0, help="time per throughput measurement")
    ap.add_argument("--photo", help="also time the whole predict pipeline (decode, detect, crop, classify) on it")
    ap.add_argument("--user-waits", action="store_true",
                    help="time one face and one photo through `fervit predict` and `fervit serve` per model")
    ap.add_argument("--data", help="FER root for --user-waits' faces (default: as fervit resolves it)")
    args = ap.parse_args(argv)
    if args.user_waits:
        if not args.photo:
            ap.error("--user-waits times a photo too: give --photo PHOTO.jpg (python tests/photo.py makes one)")
        return user_waits(args.model, args.data, args.threads, Path(args.photo))

    from fervit.data.images import normalize
    from fervit.inference.onnx import export_onnx, load_onnx

    torch.set_num_threads(args.threads)
    load0 = load_average()
    one = normalize(torch.randint(0, 256, (1, 48, 48), dtype=torch.uint8))
    batch = normalize(torch.randint(0, 256, (args.batch, 48, 48), dtype=torch.uint8))
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fervit-bench-"))
    models = list(models_to_time(args.model))
    bar = tqdm(total=len(models) * 2, desc="benchmarking", unit="backend", file=sys.stderr)
    for label, model, meta in models:
        model.eval()
        onnx_path = export_onnx(model, meta, tmp / f"{meta.model.name}.onnx")
        classifier, _ = load_onnx(onnx_path, threads=args.threads)

        @torch.inference_mode()
        def eager(x, model=model):
            return model(x)

        backends = [("PyTorch eager", eager, lambda t: t),
                    ("ONNX Runtime", classifier, lambda t: t.numpy())]
        for name, fn, convert in backends:
            med, fastest = latency_ms(fn, convert(one), warmup=20, runs=args.runs)
            ips, best_ips = throughput(fn, convert(batch), args.seconds)
            rows.append((label, name, med, fastest, ips, best_ips))
            bar.update()
    bar.close()

    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} logical cores, {args.threads} threads | "
          f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, "
          f"Python {platform.python_version()} | OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']} | "
          f"load average before/after: {load0} / {load_average()}\n")
    print(f"| model | backend | bs=1 latency: median (fastest) | bs={args.batch} throughput: overall (fastest batch) |")
    print("|---|---|---|---|")
    for label, name, med, fastest, ips, best_ips in rows:
        print(f"| {label} | {name} | {med:.1f} ms ({fastest:.1f} ms) | {ips:,.0f} ({best_ips:,.0f}) faces/s |")

    if args.photo:
        from PIL import Image

        from fervit.inference.faces import open_image
        from fervit.inference.predictor import Predictor

        label, model, meta = models[0]
        predictor = Predictor(classifier=load_onnx(tmp / f"{meta.model.name}.onnx", args.threads)[0],
                              meta=meta)
        data = Path(args.photo).read_bytes()
        n_faces = len(predictor.predict_images([("photo", open_image(data))])[0].faces)
        med, fastest = latency_ms(lambda d: predictor.predict_images([("photo", open_image(d))]), data,
                                  warmup=3, runs=30)
        size = Image.open(args.photo).size
        print(f"\nWhole pipeline, {label} on ONNX Runtime: {Path(args.photo).name} ({size[0]}x{size[1]}, "
              f"{n_faces} faces): {med:.1f} ms median ({fastest:.1f} ms fastest) per photo")
    return 0


FACE = "test/happy/PrivateTest_10077120.jpg"  # the FER-2013 face timed alone, under the data root


def user_waits(models: list[str], data: str | None, threads: int, photo: Path, cli_runs: int = 5,
               api_runs: int = 30, backends: tuple[str, ...] = ("auto", "torch")) -> int:
    """Median wall time of one face and `photo` through `fervit predict` (a new process each) and
    `fervit serve` (in-process app, sequential requests), for each model (default: the shipped one) and backend
    (auto: ONNX Runtime for the shipped model when installed, the command a user types; torch: PyTorch)."""
    import subprocess

    from fastapi.testclient import TestClient

    from fervit.data.location import resolve_data_root
    from fervit.inference.predictor import Predictor, shipped_model
    from fervit.serve.app import create_app

    root = Path(resolve_data_root(data or ""))
    tmp = Path(tempfile.mkdtemp(prefix="fervit-waits-"))
    face, photo = root / FACE, photo.resolve()
    models = [str(Path(m).resolve()) for m in models] or [str(shipped_model())]
    Predictor.load(models[0])  # untimed: the first load also pays for the imports
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rows = []
    for model, backend in ((m, b) for m in models for b in backends):
        def cli(path, *flags):
            cmd = [sys.executable, "-m", "fervit", "predict", str(path), "--json", "--model", model,
                   "--backend", backend, *flags]
            times = []
            for _ in range(cli_runs):
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=tmp)
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e3

        t0 = time.perf_counter()
        predictor = Predictor.load(model, backend)
        load_ms = (time.perf_counter() - t0) * 1e3
        with TestClient(create_app(predictor)) as client:
            def api(path):
                data = path.read_bytes()
                post = lambda: client.post("/predict", files={"file": (path.name, data, "image/jpeg")})  # noqa: E731
                assert post().status_code == 200
                times = []
                for _ in range(api_runs):
                    t0 = time.perf_counter()
                    post()
                    times.append(time.perf_counter() - t0)
                return statistics.median(times) * 1e3

            rows.append((model, predictor.backend, load_ms, cli(face, "--no-detect"), cli(photo), api(face),
                         api(photo)))
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} logical cores, {threads} threads | torch {torch.__version__} | "
          f"Python {platform.python_version()} | load average {load_average()} | medians of {cli_runs} commands "
          f"and {api_runs} requests\n")
    print("| model | backend | load | `fervit predict` one face | `fervit predict` photo (3 faces) | serve: one face | "
          "serve: photo |")
    print("|---|---|---|---|---|---|---|")
    for model, backend, load_ms, *ms in rows:
        print(f"| {model} | {backend} | {load_ms:.0f} ms | " + " | ".join(f"{m:.0f} ms" for m in ms) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
