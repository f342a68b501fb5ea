"""The PyTorch backend of the predictor: a model file (.safetensors + .json) -> a classifier of normalised faces.
Imported only when a PyTorch model answers, so that ONNX Runtime inference never loads torch."""

from __future__ import annotations

import os

import numpy as np
import torch

from fervit.device import resolve_device
from fervit.model_file import ModelFile
from fervit.models.checkpoint import load_model


class TorchClassifier:
    """Eager PyTorch: normalised faces (B, 1, 48, 48) float32 -> logits (B, C) numpy."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model.eval(), device

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # the TTA views are flipped views with negative strides
        return self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()


def load_torch(path: str | os.PathLike, device: str = "cpu") -> tuple[TorchClassifier, ModelFile]:
    """(classifier, model description) for a run folder or .safetensors checkpoint on `device`."""
    dev = resolve_device(device)
    model, meta = load_model(path, dev)
    return TorchClassifier(model, dev), meta
