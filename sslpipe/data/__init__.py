"""In-memory image splits and the loaders that batch them.

Every data set is read once into uint8 tensors (N, C, H, W): small data sets fit, and
batches are then plain index lookups with no per-sample Python work. Augmentation runs
batched on the training device (`sslpipe.data.views`)."""

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


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                batch_size: int | None = None) -> torch.Tensor:
    """This rank's sample order for one epoch: a permutation seeded by (seed, epoch), so a
    resumed run sees the same order, cut to a multiple of world_size. With `batch_size` (the
    per-rank batch) each global batch of world_size x batch_size consecutive samples is dealt
    in contiguous blocks, rank r taking the r-th: the global batches, and which samples share
    a rank's BatchNorm statistics, are the same as one process's batch of that size split in
    world_size groups (split BN), whatever the number of ranks. The tail (fewer than a global
    batch) is shared out evenly the same way. Without it: every world_size-th sample from
    `rank` (DistributedSampler's scheme, for evaluation). Shared by the memory and stream loaders."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n)
    order = order[: (n // world_size) * world_size]
    if batch_size is None or world_size == 1:
        return order[rank::world_size]
    full = (len(order) // (world_size * batch_size)) * world_size * batch_size
    head = order[:full].view(-1, world_size, batch_size)[:, rank].reshape(-1)
    return torch.cat([head, order[full:].view(world_size, -1)[rank]])


class EpochLoader:
    """Batches of (uint8 images, labels) from a `Split`, shuffled per epoch by a generator
    seeded from (seed, epoch) so that a resumed run sees the same order; `start` skips
    batches already done. With world_size > 1 each rank takes every world_size-th sample
    of the shared permutation (DistributedSampler's scheme)."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.shuffle, self.drop_last = split, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0
        if drop_last and len(self) == 0:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {len(split) // world_size} training images per rank; "
                f"lower the batch size"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        n = len(self.split) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = epoch_order(len(self.split), self.shuffle, self.seed, self.epoch, self.rank, self.world_size,
                            self.batch_size)
        for b in range(self.start, len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.split.images[index], self.split.labels[index]


def require_files(dataset: str, root: str, relpaths: list[str], hint: str) -> None:
    """Fail before reading when files are missing: name the root, each missing file, and the fix."""
    from pathlib import Path

    missing = [p for p in relpaths if not (Path(root) / p).exists()]
    if missing:
        shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        raise FileNotFoundError(f"{dataset}: missing under root='{root}': {shown}. {hint}")
