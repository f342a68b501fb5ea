"""Train/val/test index splits for the two protocols."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fervit.data.dataset import USAGES, FerData
from fervit.errors import FervitError

PROTOCOLS = ("seed", "fer2013")


@dataclass
class Splits:
    train: torch.Tensor  # (n_train,) int64 indices into FerData
    val: torch.Tensor
    test: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def make_splits(data: FerData, protocol: str = "seed", val_fraction: float = 0.1, seed: int = 0,
                drop_eval_duplicates: bool = False) -> Splits:
    """`seed`: stratified seeded split of train/ into train/val, test = all of test/.
    `fer2013`: Training / PublicTest (val) / PrivateTest (test) from file names or the CSV's Usage."""
    if protocol == "seed":
        if not 0.0 < val_fraction < 1.0:
            raise FervitError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
        pool = torch.nonzero(data.folder == 0).flatten()
        if len(pool) == 0:
            raise FervitError("the seed protocol needs a train/ folder (or Training rows), and none was found")
        gen = torch.Generator().manual_seed(seed)
        train, val = [], []
        for c in range(int(data.labels.max()) + 1):
            idx = pool[data.labels[pool] == c]
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_val = int(round(len(idx) * val_fraction))
            val.append(idx[:n_val])
            train.append(idx[n_val:])
        splits = Splits(torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values,
                        torch.nonzero(data.folder == 1).flatten())
    elif protocol == "fer2013":
        known = data.usage != 0
        if not bool(known.any()):
            raise FervitError("the fer2013 protocol needs Training_/PublicTest_/PrivateTest_ file names or a "
                              "Usage column, and this data has neither; use --protocol seed")
        by = {u: torch.nonzero(data.usage == USAGES.index(u)).flatten() for u in USAGES[1:]}
        splits = Splits(by["Training"], by["PublicTest"], by["PrivateTest"])
    else:
        raise FervitError(f"unknown protocol '{protocol}'; choose one of {', '.join(PROTOCOLS)}")
    if drop_eval_duplicates:
        splits.train = drop_duplicates_of(data, splits.train, torch.cat([splits.val, splits.test]))
    return splits


def image_hashes(images: torch.Tensor) -> list[bytes]:
    """A content hash per image: equal hashes mean pixel-identical images."""
    import hashlib

    flat = images.reshape(len(images), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def drop_duplicates_of(data: FerData, keep_from: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Indices of `keep_from` whose image is not pixel-identical to any image in `reference`."""
    ref = set(image_hashes(data.images[reference]))
    hashes = image_hashes(data.images[keep_from])
    mask = torch.tensor([h not in ref for h in hashes], dtype=torch.bool)
    return keep_from[mask]
