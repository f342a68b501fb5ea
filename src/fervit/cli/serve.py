"""`fervit serve`: the web page and JSON API on a local port."""

from __future__ import annotations

from fervit.cli.predict import MODEL_HELP, RUNS_HELP


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="web page + JSON API: upload a photo or use the webcam",
                       description="Serve a page where faces in an uploaded photo or the webcam are boxed and "
                                   "labelled, and the JSON API it uses (POST /predict, GET /health, docs at /docs).")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on; 0 picks a free one "
                                                                   "(default: %(default)s)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--runs", default="runs", metavar="DIR", help=RUNS_HELP)
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="auto: ONNX Runtime for .onnx files, else PyTorch; onnx: the export beside the checkpoint "
                        "(default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload")
    p.add_argument("--max-megapixels", type=float, default=25.0, help="largest accepted image, in pixels")
    p.add_argument("--upload-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request (headers and upload) must arrive within this time, else 408 and the client is "
                        "dropped (default 30)")
    p.set_defaults(func=run_serve)


def port_number(text: str) -> int:
    """argparse type for --port: 0 (any free port) to 65535."""
    import argparse

    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 (any free one) to 65535, got '{text}'")
    return port


def bind_port(host: str, port: int):
    """A socket bound to host:port, or a one-line error: before "serving on" is printed, so that a busy port is
    said as such instead of uvicorn's [Errno 98] after a line that claims the server is up."""
    import errno
    import socket

    from fervit.errors import FervitError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise FervitError(f"--host '{host}' is not a name or address this machine knows ({e.strerror}); use "
                          "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port just closed is free again
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise FervitError(f"port {port} on {host} is already in use (another `fervit serve`?); stop that server "
                              "or pick another port with --port N") from None
        if e.errno == errno.EACCES:
            raise FervitError(f"port {port} needs root (ports below 1024 are privileged); pick one above 1023, "
                              "e.g. --port 8000") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise FervitError(f"--host '{host}' is not an address of this machine; use 127.0.0.1 (this machine "
                              "only) or 0.0.0.0 (every interface)") from None
        raise FervitError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def run_serve(args) -> int:
    import sys

    from fervit.errors import FervitError

    try:
        import uvicorn

        from fervit.serve.app import UploadLimits, create_app
        from fervit.serve.server import server_config
    except ImportError as e:
        raise FervitError(f"serving needs the serve extra ({e.name} is missing): pip install 'fervit[serve]'") \
            from None
    from fervit.inference.predictor import Predictor, model_line

    if not 0 < args.upload_timeout < float("inf"):  # also NaN
        raise FervitError(f"--upload-timeout must be a number of seconds above 0, got {args.upload_timeout}")
    sock = bind_port(args.host, args.port)  # first: a busy port fails before the model is loaded
    predictor = Predictor.load(args.model, args.backend, runs_dir=args.runs)
    print(model_line(predictor.source, predictor.meta), file=sys.stderr)
    predictor.detector  # load OpenCV now: a missing extra should fail at startup, not on the first request
    limits = UploadLimits(max_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6))
    app = create_app(predictor, limits)
    port = sock.getsockname()[1]  # the one chosen for --port 0
    print(f"fervit: serving {predictor.source} ({predictor.backend}) on http://{args.host}:{port}", flush=True)
    uvicorn.Server(server_config(app, args.host, port, args.upload_timeout)).run(sockets=[sock])
    return 0
