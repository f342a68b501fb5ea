"""The ONNX Runtime backend: an `.onnx` file written by `fervit export` (or shipped with the package) -> a
classifier of normalised faces. Nothing here imports torch, so `fervit predict` on ONNX Runtime starts in a
fraction of the time that importing torch takes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fervit.errors import FervitError
from fervit.model_file import ModelFile

META_KEY = "fervit"  # the ONNX metadata key that holds the model file's JSON description


def require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise FervitError(f"ONNX support needs {module}: pip install 'fervit[onnx]'") from None


class OnnxClassifier:
    """ONNX Runtime on the CPU: normalised faces (B, 1, 48, 48) float32 -> logits (B, C) numpy."""

    backend = "onnx"

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def load_onnx(path: str | os.PathLike, threads: int = 0) -> tuple[OnnxClassifier, ModelFile]:
    """(classifier, model description) for an .onnx file written by `export_onnx`; one-line errors otherwise."""
    ort = require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise FervitError(f"ONNX model '{path}' does not exist; write one with `fervit export RUN_DIR`")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    # idle worker threads sleep rather than spin: on a small shared CPU spinning steals the busy thread's core
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception classes for damaged or foreign files
        raise FervitError(f"'{path}' is not a loadable ONNX model ({str(e).splitlines()[0][:200]}); "
                          "re-run `fervit export`") from None
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise FervitError(f"'{path}' was not written by `fervit export` (no '{META_KEY}' metadata); "
                          "export the run folder with `fervit export`")
    return OnnxClassifier(session), ModelFile.from_dict(meta, path)
