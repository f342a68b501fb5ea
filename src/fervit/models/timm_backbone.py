"""Fine-tune a timm backbone on FER: `--set model.name=timm --set model.backbone=resnet18`.

The backbone takes the 1-channel faces directly (timm folds a pre-trained RGB stem into one channel),
its classifier gets `num_classes` outputs, and faces are resized inside the model when
`model.input_size` asks for a larger input, so evaluation, prediction and ONNX export need nothing
special. Pre-trained weights come only from a local safetensors file (`model.pretrained`), loaded
through timm's own loader, which adapts the stem, drops the ImageNet classifier and resamples a
ViT's position embeddings. Needs the `timm` extra, and timm needs a torchvision built for your torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fervit.config import ModelConfig
from fervit.errors import FervitError
from fervit.models.registry import register_model


def import_timm():
    """timm, or a one-line FervitError saying how to get a working one."""
    try:
        import timm
    except ImportError:
        raise FervitError("model 'timm' needs timm: pip install 'fervit[timm]' (with a torchvision built for "
                          "your torch)") from None
    except Exception as e:  # e.g. a torchvision built for another torch fails while timm imports it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FervitError(f"timm is installed but does not import ({first}); install a torchvision that "
                          "matches your torch") from None
    return timm


class TimmClassifier(nn.Module):
    """A timm model behind fervit's interface: (B, in_chans, img_size, img_size) -> (B, num_classes)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.backbone:
            raise ValueError("set model.backbone to a timm model name, e.g. resnet18")
        timm = import_timm()
        if not timm.is_model(cfg.backbone):
            close = difflib.get_close_matches(cfg.backbone.split(".")[0], timm.list_models(), n=4, cutoff=0.6)
            hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
            raise ValueError(f"timm has no model '{cfg.backbone}'{hint}")
        try:
            pretrained_cfg = timm.models.get_pretrained_cfg(cfg.backbone)
        except RuntimeError as e:  # a known architecture with an unknown weights tag
            raise ValueError(str(e)) from None
        # models with a fixed token grid (ViTs, Swin, ...) are built for the size they will see
        self.fixed_input_size = bool(getattr(pretrained_cfg, "fixed_input_size", False))
        self.cfg = cfg
        self.input_size = cfg.input_size or cfg.img_size
        self.backbone = timm.create_model(cfg.backbone, **self._timm_kwargs())

    def _timm_kwargs(self) -> dict:
        kwargs = dict(in_chans=self.cfg.in_chans, num_classes=self.cfg.num_classes, drop_rate=self.cfg.dropout)
        if self.cfg.drop_path:
            kwargs["drop_path_rate"] = self.cfg.drop_path
        if self.fixed_input_size:
            kwargs["img_size"] = self.input_size
        return kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.backbone(x)

    def load_pretrained(self, path: Path, log=print) -> None:
        """Load timm-format weights (e.g. a Hugging Face hub `model.safetensors`) through timm's loader."""
        timm = import_timm()
        try:
            donor = timm.create_model(self.cfg.backbone, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(path)), **self._timm_kwargs())
        except (RuntimeError, KeyError, ValueError, AssertionError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise FervitError(f"the weights in '{path}' do not fit timm model '{self.cfg.backbone}' ({first})") from None
        self.backbone.load_state_dict(donor.state_dict())
        log(f"loaded timm weights for {self.cfg.backbone} from {path} (stem adapted to {self.cfg.in_chans} "
            f"channel(s), new {self.cfg.num_classes}-class head)")


@register_model("timm")
def _timm(cfg: ModelConfig) -> nn.Module:
    return TimmClassifier(cfg)
