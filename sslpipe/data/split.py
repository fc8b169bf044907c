"""In-memory image splits: uint8 tensors (N, C, H, W) with labels (and masks where a data set
has them), their subsets (label fraction, data ratio), and the conversions readers use to
make them.

Every small data set is read once into such tensors: batches are then plain index lookups
with no per-sample Python work, and augmentation runs batched on the training device
(`sslpipe.data.views`). Data that does not fit takes the streaming path (`files.py`,
`stream.py`, `shards.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,); -1 where unlabelled
    masks: torch.Tensor | None = None  # uint8 (N, H, W) segmentation masks, where the data set has them

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | torch.Tensor) -> "Split":
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index], self.labels[index], None if self.masks is None else self.masks[index])


@dataclass
class Splits:
    train: Split
    test: Split
    val: Split | None = None
    classes: list[str] = field(default_factory=list)
    # Images for pretraining only (labels -1), e.g. STL-10's 100k unlabelled split; the
    # pretraining pool is train + unlabeled, the probes see train alone.
    unlabeled: Split | None = None
    # "memory": Split tensors; "stream": sslpipe.data.files.FileSplit, decoded per sample
    loader: str = "memory"


def concat(*splits: Split) -> Split:
    """One split from several of the same image size; masks survive only where all have them."""
    masks = [s.masks for s in splits]
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]),
                 torch.cat(masks) if all(m is not None for m in masks) else None)


def data_ratio_subset(split: Split, ratio: float, seed: int) -> Split:
    """Keep `ratio` of the images at all (the `--data_ratio` of SimCLR segmentation fine-tuning on
    Oxford-IIIT Pet): stratified by class where every image is labelled, a plain random subset
    otherwise (unlabelled pretraining pools)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"data_ratio must be in (0, 1], got {ratio}")
    if ratio == 1.0:
        return split
    if bool((split.labels >= 0).all()):
        return stratified_fraction(split, ratio, seed)
    rng = np.random.default_rng(seed)
    n = max(1, int(round(ratio * len(split))))
    return split.subset(np.sort(rng.choice(len(split), size=n, replace=False)))


def stratified_fraction(split: Split, fraction: float, seed: int) -> Split:
    """Keep `fraction` of each class (at least one image per class), e.g. 0.1 as in UP's MoCo v1
    fine-tune config."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return split
    rng = np.random.default_rng(seed)
    labels = split.labels.numpy()
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(members))))
        keep.append(rng.choice(members, size=n, replace=False))
    return split.subset(np.sort(np.concatenate(keep)))


def to_uint8_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, H, W) uint8 tensor."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[:, :, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 (N, C, H, W), in chunks so that float copies
    stay small (STL-10's 100k unlabelled images would take 11 GB as one float tensor)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = torch.nn.functional.interpolate(images[start:start + chunk].float(), size=(size, size), mode="bilinear",
                                               align_corners=False, antialias=True)
        out[start:start + chunk] = part.round().clamp(0, 255).to(torch.uint8)
    return out


def check_splits(splits, name: str, channels: int, num_classes: int, image_size: int, labelled: bool) -> None:
    """Data faults caught before training: wrong channel count or image size, labels out of
    range, empty splits or classes. The message names the split and the first bad index."""
    from sslpipe.validate import ConfigError

    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    for split_name, split in parts.items():
        if split is None:
            continue
        where = f"dataset={name} {split_name} split"
        if len(split) == 0:
            raise ConfigError(f"{where} is empty")
        if not hasattr(split, "images"):  # streamed: read at dataset.image_size / channels by construction
            c, h, w = split.channels, image_size, image_size
        else:
            c, h, w = split.images.shape[1:]
        if c != channels:
            raise ConfigError(f"{where} has {c}-channel images but dataset.channels={channels}")
        if (h, w) != (image_size, image_size):
            raise ConfigError(f"{where} has {h}x{w} images but dataset.image_size={image_size}")
        labels = split.labels
        bad = torch.nonzero((labels >= num_classes) | (labels < (-1 if split_name == "train" and not labelled else 0)))
        if len(bad):
            i = int(bad[0])
            raise ConfigError(f"{where}: label {int(labels[i])} at index {i} is outside 0..{num_classes - 1} "
                              f"(dataset.num_classes={num_classes})")
    if labelled:
        counts = torch.bincount(splits.train.labels.clamp_min(0), minlength=num_classes)
        empty = [i for i, n in enumerate(counts.tolist()) if n == 0]
        if empty:
            raise ConfigError(f"dataset={name} train split has no images of class(es) {empty}; a probe needs every class")
