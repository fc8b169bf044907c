"""The one place a stage gets its batches: the same call for a split held in memory
(`Split`, batched by index lookups) and a split streamed from files (`FileSplit`, decoded in
DataLoader workers)."""

from __future__ import annotations

import logging

import torch

from sslpipe.data.epochs import EpochLoader

from sslpipe.data.split import Split
from sslpipe.data.files import FileSplit
from sslpipe.data.shards import ShardLoader, ShardSplit
from sslpipe.data.stream import CropSpec, StreamLoader

log = logging.getLogger(__name__)

# Share of the GPU's free memory that an in-memory split's uint8 image pool may take: CIFAR-10's
# 50k images are 150 MB, so a batch becomes an index lookup on the device with no host-to-device
# copy to wait for; a pool too large for that stays on the host and each batch is copied.
POOL_SHARE = 0.25


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


def device_pool(split: Split, device: torch.device) -> Split:
    """`split` on `device` when it fits in POOL_SHARE of the free GPU memory; else `split` itself."""
    if device.type != "cuda":
        return split
    need = split.images.nbytes
    free, _ = torch.cuda.mem_get_info(device)
    if need <= POOL_SHARE * free:
        return Split(split.images.to(device), split.labels)  # labels stay on the host: samplers read them
    log.info("image pool (%.1f GB) kept on the host: more than %.0f%% of the GPU's free %.1f GB",
             need / 1e9, 100 * POOL_SHARE, free / 1e9)
    return split
