"""The two pipelines fervit is measured against, built from the same `AugmentConfig` as fervit's own.

- the usual one: a torch `Dataset` that opens each JPEG with PIL and runs torchvision's classic
  per-image transforms in `DataLoader` workers, then copies each batch to the device;
- kornia's `AugmentationSequential`: batched on the device like fervit, op by op.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fervit.benchmark.harness import optimizer_step
from fervit.config import AugmentConfig, RunConfig
from fervit.data.images import MEAN, STD
from fervit.device import autocast
from fervit.errors import FervitError

BENCH_EXTRA_HINT = "install the benchmark's extras with: pip install 'fervit[bench]'"
_torchvision_op_stubs = None  # keeps the stub library alive for the process (see torchvision_transforms)


def torchvision_transforms():
    """`torchvision.transforms`, also where the installed wheel's C++ ops cannot load.

    PyPI's Linux torchvision wheels are built against CUDA torch; beside a CPU-only torch their C++ ops
    do not load, and `import torchvision` then fails while registering fake kernels for two of them.
    The transforms are pure Python/PIL and never call those ops, so declaring the two ops suffices.
    """
    global _torchvision_op_stubs
    try:
        import torchvision.transforms as T

        return T
    except ImportError:
        raise FervitError(f"the usual pipeline needs torchvision, which is not installed; {BENCH_EXTRA_HINT}") from None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left half-initialised modules behind
    _torchvision_op_stubs = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _torchvision_op_stubs.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision.transforms as T

    return T


def torchvision_version() -> str | None:
    try:
        torchvision_transforms()
    except FervitError:
        return None
    import torchvision

    return torchvision.__version__


def usual_train_transform(preset: RunConfig):
    """The per-image training transform of the usual FER-2013 pipeline, with the preset's augmentation ranges.

    Its images have the side fervit trains the preset on (its crop, else the whole face), so that both
    pipelines feed the model the same pixels and a ratio of their speeds measures the pipelines alone.
    """
    cfg, size = preset.augment, preset.model.trained_side()
    T = torchvision_transforms()
    return T.Compose([
        T.RandomHorizontalFlip(p=cfg.hflip),
        T.RandomAffine(degrees=cfg.rotation, translate=(cfg.translate, cfg.translate)),
        T.RandomResizedCrop(size, scale=cfg.scale, ratio=cfg.ratio),
        T.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast),
        T.ToTensor(),
        T.Normalize([MEAN], [STD]),
        T.RandomErasing(p=cfg.erase_p, scale=cfg.erase_scale, ratio=cfg.erase_ratio, value=0),
    ])


def usual_eval_transform():
    """The usual evaluation transform: decode, to tensor, normalise."""
    T = torchvision_transforms()
    return T.Compose([T.ToTensor(), T.Normalize([MEAN], [STD])])


class ImageFiles(Dataset):
    """The usual Dataset: item i opens one image file with PIL and transforms it on its own."""

    def __init__(self, root: str | Path, paths: list[str], labels: list[int], transform):
        self.root, self.paths, self.labels, self.transform = Path(root), paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        with Image.open(self.root / self.paths[i]) as im:
            return im.convert("L")

    def __getitem__(self, i: int):
        return self.transform(self.load(i)), self.labels[i]


def usual_loader(dataset: ImageFiles, batch_size: int, workers: int, device: torch.device,
                 train: bool) -> DataLoader:
    """The usual DataLoader: shuffled with a dropped last batch for training, pinned memory on CUDA.

    Workers persist across epochs so that a timing window that spans an epoch boundary does not pay
    worker start-up; that only flatters the usual pipeline.
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def kornia_augment(cfg: AugmentConfig, size: int = 48) -> nn.Module:
    """kornia's AugmentationSequential with the ops and ranges of fervit's `augment_batch`.

    Input (B, 1, H, W) float in [0, 1] on any device; output normalised like fervit's.
    """
    try:
        import kornia.augmentation as K
    except ImportError:
        raise FervitError(f"the kornia comparison needs kornia, which is not installed; {BENCH_EXTRA_HINT}") from None
    return K.AugmentationSequential(
        K.RandomHorizontalFlip(p=cfg.hflip),
        K.RandomAffine(degrees=cfg.rotation, translate=(cfg.translate, cfg.translate), p=1.0),
        K.RandomResizedCrop((size, size), scale=cfg.scale, ratio=cfg.ratio, p=1.0),
        K.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, p=1.0),
        K.Normalize(mean=torch.tensor([MEAN]), std=torch.tensor([STD])),
        K.RandomErasing(scale=cfg.erase_scale, ratio=cfg.erase_ratio, value=0.0, p=cfg.erase_p),
    )


def index_batches(indices: torch.Tensor, batches: int, batch_size: int, gen: torch.Generator):
    """`batches` index batches drawn epoch by epoch from fresh permutations, as the trainer draws them."""
    n, pos, order = len(indices), len(indices), indices
    for _ in range(batches):
        if pos + batch_size > n:
            order, pos = indices[torch.randperm(n, generator=gen, device=indices.device)], 0
        yield order[pos:pos + batch_size]
        pos += batch_size


class UsualBatches:
    """The usual DataLoader, iterated across epoch boundaries, each batch copied to the device."""

    def __init__(self, dataset: ImageFiles, batch_size: int, workers: int, device: torch.device, train: bool):
        self.loader = usual_loader(dataset, batch_size, workers, device, train)
        self.device = device
        self._stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream = None
        self.loader = None  # its persistent workers shut down with it

    def _to_device(self, batch):
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def batches(self, k: int):
        """The next k batches, continuing where the last call stopped, wrapping over epochs."""
        if self._stream is None:
            self._stream = itertools.chain.from_iterable(itertools.repeat(self.loader))
        for batch in itertools.islice(self._stream, k):
            yield self._to_device(batch)

    def take(self, k: int) -> None:
        for _ in self.batches(k):
            pass

    def epoch(self):
        """One whole pass, from the start of the dataset."""
        self._stream = None
        for batch in self.loader:
            yield self._to_device(batch)


def usual_cpu_parts(preset: RunConfig, device: torch.device):
    """The usual script's own model on a CPU: fp32 NCHW, a user's default AdamW, a constant schedule."""
    from fervit.models import build_model

    model = build_model(preset.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.optim.lr)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def usual_training(usual: UsualBatches, train_model: nn.Module, model: nn.Module, optimizer, scheduler,
                   preset: RunConfig, amp_dtype):
    """The usual training loop over `usual`'s batches: `steps(k)` trains k steps."""
    running = {"loss": 0.0, "correct": 0}

    def steps(k: int) -> None:
        train_model.train()
        for x, y in usual.batches(k):
            with autocast(usual.device, amp_dtype):
                logits = train_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=preset.optim.label_smoothing)
            optimizer_step(loss, model, optimizer, scheduler, preset.optim.grad_clip)
            # the usual loop keeps its running metrics as Python numbers: a host sync every step
            running["loss"] += loss.item() * len(y)
            running["correct"] += int((logits.argmax(-1) == y).sum().item())

    return steps
