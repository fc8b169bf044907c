"""The one place a stage gets its batches: the same call for a split held in memory
(`Split`, batched by index lookups) and a split streamed from files (`FileSplit`, decoded in
DataLoader workers)."""

from __future__ import annotations

import torch

from sslpipe.data import EpochLoader, Split
from sslpipe.data.files import FileSplit
from sslpipe.data.shards import ShardLoader, ShardSplit
from sslpipe.data.stream import CropSpec, StreamLoader


def is_streamed(split) -> bool:
    return isinstance(split, FileSplit)


def with_sample_ids(split):
    """The split with each image's index as its label, for a method that must know which image
    a sample is (MoCo's queue keeps its own image's keys out of a query's negatives). Works for
    a Split, a FileSplit and a ShardSplit alike: the loaders hand out `split.labels`."""
    import copy

    ids = torch.arange(len(split))
    if isinstance(split, Split):
        return Split(split.images, ids, split.masks)
    tagged = copy.copy(split)
    tagged.labels = ids
    return tagged


def ops_in_workers(split, device: torch.device) -> bool:
    """Where a streamed split's view ops (flip, colour, blur, ...) run: batched on a GPU, but in
    the DataLoader workers, per PIL image, when training on the CPU: at 224 px PIL's uint8 ops
    cost less than the batched float ones, and the workers run beside the training process
    (benchmarks/loader.py measures both). Never for the GPU-decode path (no PIL image there)."""
    return is_streamed(split) and device.type == "cpu" and split.settings.decode_device is None


def training_loader(split: Split | FileSplit, batch_size: int, crops: list[CropSpec], seed: int, rank: int = 0,
                    world_size: int = 1, drop_last: bool = True, device: torch.device | None = None):
    """Shuffled batches in (seed, epoch) order. Memory: (uint8 images, labels), cropped later on
    the device. Stream: (tuple of uint8 crops in `crops` order, labels), cut from the originals."""
    if isinstance(split, ShardSplit):
        return ShardLoader(split, split.settings, batch_size, crops=crops, shuffle=True, drop_last=drop_last, seed=seed,
                           rank=rank, world_size=world_size, pin_memory=device is not None and device.type == "cuda")
    if is_streamed(split):
        return StreamLoader(split, split.settings, batch_size, crops=crops, shuffle=True, drop_last=drop_last,
                            seed=seed, rank=rank, world_size=world_size,
                            pin_memory=device is not None and device.type == "cuda")
    return EpochLoader(split, batch_size, shuffle=True, drop_last=drop_last, seed=seed, rank=rank, world_size=world_size)


def eval_loader(split: Split | FileSplit, batch_size: int):
    """Every image once, in order, as its eval view: (uint8 images, labels) batches."""
    if isinstance(split, ShardSplit):
        return ShardLoader(split, split.settings, batch_size, crops=None, shuffle=False, drop_last=False)
    if is_streamed(split):
        return StreamLoader(split, split.settings, batch_size, crops=None, shuffle=False, drop_last=False)
    return EpochLoader(split, batch_size, shuffle=False, drop_last=False)
