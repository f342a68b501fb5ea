"""`fervit serve`: the web page and JSON API on a local port."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="web page + JSON API: upload a photo or use the webcam",
                       description="Serve a page where faces in an uploaded photo or the webcam are boxed and "
                                   "labelled, and the JSON API it uses (POST /predict, GET /health, docs at /docs).")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="run folder, .safetensors or .onnx (default: the shipped model, else the "
                                   "newest run under ./runs)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload")
    p.add_argument("--max-megapixels", type=float, default=25.0, help="largest accepted image, in pixels")
    p.add_argument("--upload-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request (headers and upload) must arrive within this time, else 408 and the client is "
                        "dropped (default 30)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from fervit.errors import FervitError

    try:
        import uvicorn

        from fervit.serve.app import UploadLimits, create_app
        from fervit.serve.server import server_config
    except ImportError as e:
        raise FervitError(f"serving needs the serve extra ({e.name} is missing): pip install 'fervit[serve]'") \
            from None
    from fervit.inference.predictor import Predictor

    if not 0 < args.upload_timeout < float("inf"):  # also NaN
        raise FervitError(f"--upload-timeout must be a number of seconds above 0, got {args.upload_timeout}")
    predictor = Predictor.load(args.model, args.backend)
    predictor.detector  # load OpenCV now: a missing extra should fail at startup, not on the first request
    limits = UploadLimits(max_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6))
    app = create_app(predictor, limits)
    print(f"fervit: serving {predictor.source} ({predictor.backend}) on http://{args.host}:{args.port}")
    uvicorn.Server(server_config(app, args.host, args.port, args.upload_timeout)).run()
    return 0
