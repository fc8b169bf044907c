"""Data sets and how they are read: an index of the package.

- `split.py`: in-memory splits (`Split`, `Splits`), their subsets, uint8 conversions
- `epochs.py`: each rank's sample order per epoch, `EpochLoader` (the memory path's batches)
- `files.py`, `stream.py`, `shards.py`, `shard.py`, `gpu_decode.py`: the streaming path (file
  listing, per-sample decode in workers, WebDataset shards and the tool that writes them, nvjpeg)
- `loaders.py`, `samplers.py`: the loader a split gets; class-balanced batches
- `views.py`, `fastaug.py`: each method's augmented views, batched on the device
- `digits.py`, `idx.py`, `imagefolder.py`, `npy.py`, `pets.py`, `shapes.py`,
  `torchvision_sets.py`: the formats read (`dataset=<name>`)
"""

from sslpipe.data.epochs import EpochLoader, epoch_order
from sslpipe.data.files import require_files
from sslpipe.data.split import (Split, Splits, concat, data_ratio_subset, resize_uint8, stratified_fraction,
                                to_uint8_nchw)

__all__ = ["EpochLoader", "Split", "Splits", "concat", "data_ratio_subset", "epoch_order", "require_files",
           "resize_uint8", "stratified_fraction", "to_uint8_nchw"]
