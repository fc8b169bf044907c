"""Pre-made splits as .npy files (as an iBOT-style ViT-S/4 CIFAR-10 pipeline loads them):
`<split>_images.npy` (N, H, W, C) or (N, H, W) uint8 and `<split>_labels.npy` (N,) integers,
for split in train, val, test, probe."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from sslpipe.data.files import require_files

from sslpipe.data.split import Split, Splits, resize_uint8, to_uint8_nchw


def _read(root: Path, split: str, images_file: str, labels_file: str, image_size: int) -> Split:
    images = np.load(root / images_file.format(split=split), allow_pickle=False)
    labels = np.load(root / labels_file.format(split=split), allow_pickle=False)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"npy: {root / images_file.format(split=split)} holds {images.dtype} {images.shape}; "
                         f"expected uint8 (N, H, W, C) or (N, H, W)")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"npy: {root / labels_file.format(split=split)} holds {labels.dtype} {labels.shape}; "
                         f"expected integer (N,) labels")
    return Split(resize_uint8(to_uint8_nchw(images), image_size), torch.from_numpy(labels.astype(np.int64)))


def _digests(images: torch.Tensor) -> list[bytes]:
    flat = images.reshape(len(images), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def load_npy(root: str, image_size: int, num_classes: int, images_file: str = "{split}_images.npy",
             labels_file: str = "{split}_labels.npy", probe: bool = True) -> Splits:
    """train and test are required, val is optional. Where a probe split exists (and `probe`),
    probes and fine-tuning train on it, and the pretraining pool is train and probe together
    (train images identical to a probe image are counted once) via `Splits.unlabeled`."""
    base = Path(root)
    names = {s: [images_file.format(split=s), labels_file.format(split=s)] for s in ("train", "val", "test", "probe")}
    require_files("npy", root, names["train"] + names["test"],
                  "Write <split>_images.npy / <split>_labels.npy there (or set dataset.source.images_file / labels_file).")

    def optional(split: str) -> Split | None:
        present = [(base / f).exists() for f in names[split]]
        if any(present) and not all(present):
            require_files("npy", root, names[split], f"The {split} split needs both files.")
        return _read(base, split, images_file, labels_file, image_size) if all(present) else None

    train = _read(base, "train", images_file, labels_file, image_size)
    test = _read(base, "test", images_file, labels_file, image_size)
    val, probe_split = optional("val"), optional("probe") if probe else None
    classes = [str(i) for i in range(num_classes)]  # .npy files carry no class names
    if probe_split is None:
        return Splits(train=train, val=val, test=test, classes=classes)
    seen = set(_digests(probe_split.images))
    extra = np.flatnonzero([d not in seen for d in _digests(train.images)])
    pool = train.subset(extra)
    unlabeled = Split(pool.images, torch.full((len(pool),), -1, dtype=torch.long))
    return Splits(train=probe_split, val=val, test=test, classes=classes, unlabeled=unlabeled)
