"""The streaming path: images read and decoded per sample in DataLoader worker processes.

For data that does not fit in memory (ImageNet-1k decoded at 224 px is about 190 GB): the
main process holds only the compact file table (`sslpipe.data.files`), each worker opens
its images, cuts every training view (global and local, DINO's multi-crop) from the
*original* image with torchvision's RandomResizedCrop parameters, and hands uint8 crops to
the training device, where the batched colour ops run (`sslpipe.data.views`). Evaluation
reads the standard view: shorter side to size / crop_ratio, centre crop (0.875 is the
256 -> 224 ImageNet protocol).

Order and randomness are functions of (seed, epoch, index), not of the worker that happens
to read a sample: the order is `epoch_order` (the memory loader's), each sample's crop boxes
come from a generator seeded by (seed, epoch, index), and `set_epoch(epoch, start)` skips
the batches already trained. A run killed mid-epoch therefore resumes on exactly the
samples and crops it would have seen.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sslpipe.data.epochs import epoch_order
from sslpipe.data.fastaug import RandomResizedCrop
from sslpipe.data.files import FileSplit, ReadSettings

log = logging.getLogger(__name__)

LOADERS = ("auto", "memory", "stream", "gpu")


class BadImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class CropSpec:
    """`count` random resized crops of `size` px, area in `scale`, aspect ratio in `ratio`;
    with `augment` (a `sslpipe.data.views.AugmentSpec`) the worker also applies the view's
    other ops to each crop (`worker_ops`), else they run batched on the training device."""

    count: int
    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    augment: object | None = None


def worker_ops(spec, size: int, colour: bool):
    """The view ops after the crop, per PIL image, in `sslpipe.data.views.Augment`'s order and
    with its parameters: flip, rotation, colour jitter, grayscale, blur, solarize (torchvision's
    PIL transforms; lightly's PIL Gaussian blur with sigma in (0.1, 2) px). For CPU training,
    where the batched float ops cost more than PIL's uint8 ones at 224 px (measured by
    benchmarks/loader.py) and run in the DataLoader workers instead of the training process."""
    from lightly.transforms import GaussianBlur
    from torchvision import transforms as T

    ops = []
    if spec.hflip > 0:
        ops.append(T.RandomHorizontalFlip(spec.hflip))
    if spec.rotation > 0:
        ops.append(T.RandomRotation(spec.rotation, interpolation=T.InterpolationMode.BILINEAR))
    if spec.jitter_prob > 0:
        ops.append(T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation if colour else 0.0,
                                                spec.hue if colour else 0.0)], p=spec.jitter_prob))
    if spec.grayscale_prob > 0 and colour:
        ops.append(T.RandomGrayscale(spec.grayscale_prob))
    if spec.blur_prob > 0:
        ops.append(GaussianBlur(prob=spec.blur_prob, sigmas=(0.1, 2.0)))
    if spec.solarize_prob > 0:
        ops.append(T.RandomSolarize(128, p=spec.solarize_prob))  # kornia's default threshold 0.5 of 255
    return T.Compose(ops)


def worker_count(setting: int | str) -> int:
    """`auto`: CPUs this process may use (SLURM_CPUS_PER_TASK under SLURM, else the affinity
    mask shared among the node's local ranks) less one for the training process, 1..16."""
    if setting != "auto":
        if int(setting) < 0:
            raise ValueError(f"dataset.workers={setting} must be auto or >= 0")
        return int(setting)
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        cpus = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])
        cpus = len(os.sched_getaffinity(0)) // max(1, local)
    return max(1, min(16, cpus - 1))


# ------------------------------------------------------------------ per-sample reading
def open_image(path: str) -> Image.Image:
    """The image at `path`, lazily opened (header read, pixels not yet decoded)."""
    try:
        image = Image.open(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from None
    return image


def _decode(image: Image.Image, path: str, mode: str, boxes: np.ndarray, out_sizes: list[int]) -> tuple[Image.Image, np.ndarray]:
    """Decode `image` in `mode`; JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when
    every crop box still has at least its output size at that scale. Returns the image and
    the boxes in its pixel coordinates."""
    w0, h0 = image.size  # before draft(), which changes the size at once
    if image.format == "JPEG" and len(boxes):
        sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / np.asarray(out_sizes)
        factor = 1
        while factor < 8 and sides.min() >= 2 * factor:
            factor *= 2
        if factor > 1:
            w, h = image.size
            image.draft(mode, (w // factor, h // factor))
    try:
        image = image.convert(mode)  # decodes; truncated files fail here
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImageError(f"cannot decode image {path}: {err}") from None
    if image.size == (w0, h0):
        return image, boxes
    w, h = image.size  # drafted: ceil(w0 / factor) x ceil(h0 / factor)
    scaled = boxes * np.array([w / w0, h / h0, w / w0, h / h0])
    return image, np.minimum(scaled, np.array([w, h, w, h], dtype=scaled.dtype))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    t = torch.from_numpy(np.array(image))  # a writable copy of the pixels
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def centre_box(width: int, height: int, crop_ratio: float) -> tuple[float, float, float, float]:
    """The eval view's box: a square of crop_ratio x the shorter side, centred."""
    side = crop_ratio * min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def draw_boxes(croppers: list[RandomResizedCrop], specs: list[CropSpec], width: int, height: int,
               generator: torch.Generator) -> np.ndarray:
    """(views, 4) crop boxes x0, y0, x1, y1 of one width x height image, in `specs` order,
    drawn as torchvision's RandomResizedCrop.get_params does."""
    return torch.cat([c.boxes(s.count, height, width, "cpu", generator) for c, s in zip(croppers, specs)]).numpy()


class TrainCrops:
    """Every view of one image, each a random resized crop of the original (then resized with
    PIL's antialiased bilinear filter): uint8 (C, size, size) tensors in `specs` order."""

    def __init__(self, specs: list[CropSpec], mode: str):
        self.specs, self.mode = list(specs), mode
        self.croppers = [RandomResizedCrop((s.size, s.size), s.scale, s.ratio) for s in self.specs]
        self.sizes = [s.size for s in self.specs for _ in range(s.count)]
        ops = [None if s.augment is None else worker_ops(s.augment, s.size, mode == "RGB") for s in self.specs]
        self.ops = [op for op, s in zip(ops, self.specs) for _ in range(s.count)]

    def __call__(self, image: Image.Image, path: str, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        boxes = draw_boxes(self.croppers, self.specs, *image.size, generator)
        image, boxes = _decode(image, path, self.mode, boxes, self.sizes)
        crops = [image.resize((size, size), Image.BILINEAR, box=tuple(box)) for size, box in zip(self.sizes, boxes.tolist())]
        if any(op is not None for op in self.ops):
            # torchvision's and lightly's PIL ops draw from the global RNGs: seed them from this
            # sample's generator, so the views stay a function of (seed, epoch, index), and put
            # the RNGs back afterwards (with dataset.workers=0 they are the training process's)
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
            numpy_state = np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                np.random.seed(seed % 2 ** 32)
                crops = [crop if op is None else op(crop) for op, crop in zip(self.ops, crops)]
            np.random.set_state(numpy_state)
        return tuple(_to_tensor(crop) for crop in crops)


class EvalCrop:
    """The eval view: shorter side to size / crop_ratio, centre crop of size px (one resize of
    the centre box, PIL bilinear, antialiased): uint8 (C, size, size)."""

    def __init__(self, size: int, crop_ratio: float, mode: str):
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"dataset.eval_crop_ratio={crop_ratio} must be in (0, 1] (0.875: the 256 -> 224 protocol)")
        self.size, self.crop_ratio, self.mode = size, crop_ratio, mode

    def __call__(self, image: Image.Image, path: str, generator: torch.Generator | None = None) -> torch.Tensor:
        box = np.array([centre_box(*image.size, self.crop_ratio)])
        image, boxes = _decode(image, path, self.mode, box, [self.size])
        return _to_tensor(image.resize((self.size, self.size), Image.BILINEAR, box=tuple(boxes[0].tolist())))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's crops: a function of (seed, epoch, index) alone."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _yield_batches(batches, eval_view: bool, decoded: bool):
    """(views, labels) of `batches` (a DataLoader or DecodedBatches iterator) as StreamLoader
    yields them. A function, not a StreamLoader method: a running generator that held its
    StreamLoader would be a reference cycle, which leaves the DataLoader to the garbage collector;
    the collector stops the index queues' feeder threads before the workers are told to exit, so
    each worker's join times out (5 s a worker, measured: 5.2 s after every eval pass with 2 workers)."""
    try:
        for views, labels in batches:
            if decoded:
                yield (views[0] if eval_view else views), labels
            else:
                yield (tuple(views) if isinstance(views, (list, tuple)) else views), labels
    finally:
        if hasattr(batches, "close"):  # GPU decode: stop its threads
            batches.close()


class FileDataset(torch.utils.data.Dataset):
    """`dataset[(index, epoch)]` -> (views or eval view, label) of one file of `split`."""

    def __init__(self, split: FileSplit, transform, seed: int, skip_bad: bool = False):
        self.split, self.transform, self.seed, self.skip_bad = split, transform, seed, skip_bad

    def __len__(self) -> int:
        return len(self.split)

    def read(self, index: int, epoch: int):
        path = self.split.paths[index]
        image = open_image(path)
        with image:
            return self.transform(image, path, sample_generator(self.seed, epoch, index))

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        for attempt in range(len(self.split)):
            at = (index + attempt) % len(self.split)
            try:
                return self.read(at, epoch), self.split.labels[at]
            except BadImageError as err:
                if not self.skip_bad:
                    raise BadImageError(f"{err} (set dataset.skip_bad_images=true to skip unreadable images)") from None
                log.warning("skipped: %s; read %s in its place", err, self.split.paths[(at + 1) % len(self.split)])
        raise BadImageError(f"no readable image in the split of {len(self.split)} files under {self.split.paths.root}")


class OrderSampler(torch.utils.data.Sampler):
    """Batches of (index, epoch) keys in `epoch_order`, from batch `start` of the epoch; with
    `endless`, on through the epochs after it (the keys carry their epoch, so the crops do not
    depend on where an iterator began)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int, rank: int, world_size: int,
                 endless: bool = False):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.endless = seed, rank, world_size, endless
        self.epoch, self.start = 0, 0

    def batches_per_epoch(self) -> int:
        per_rank = self.n // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def __iter__(self):
        epoch, start = self.epoch, self.start
        while True:
            order = epoch_order(self.n, self.shuffle, self.seed, epoch, self.rank, self.world_size,
                                self.batch_size).tolist()
            for b in range(start, self.batches_per_epoch()):
                yield [(i, epoch) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
            if not self.endless:
                return
            epoch, start = epoch + 1, 0


@dataclass
class LoaderOptions:
    """What a loader over files (StreamLoader) or shards (sslpipe.data.shards.ShardLoader) is
    told: the split and how to read it, the batch, the crops, the order and this rank's share."""

    split: FileSplit = field(repr=False)
    settings: ReadSettings
    batch_size: int
    crops: list[CropSpec] | None = None  # None: the eval view
    shuffle: bool = True
    drop_last: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    pin_memory: bool = False


@dataclass
class StreamLoader(LoaderOptions):
    """The `EpochLoader` interface (`batch_size`, `len`, `set_epoch(epoch, start)`, iteration)
    over a `FileSplit` through a DataLoader: persistent workers, pinned memory on CUDA, each
    worker `prefetch` batches ahead. Yields (views, labels): views a tuple of uint8 (B, C, s, s)
    tensors for training crops, one uint8 (B, C, s, s) tensor for the eval view.

    Training loaders read `across_epochs`: one DataLoader iterator runs on through the epoch
    boundary, so the workers (and, with GPU decode, the decode threads) are already preparing
    the next epoch's first batches while this epoch's last steps train. Restarting the iterator
    per epoch, as a DataLoader loop does, left the first steps of each epoch waiting for the
    workers to refill: measured on an H200 (ResNet-50 SimCLR, batch 512, 27 steps per epoch),
    a 10-step window holding an epoch boundary waited 21-26 % of its time, against 0-1 % for
    windows without one (docs/benchmarks.md). An iterator is kept only while the trainer asks
    for the batch it is at; any other `set_epoch` (resume, a rewind) starts a new one there."""

    across_epochs: bool = True
    workers: int = field(init=False)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        mode = "L" if self.split.channels == 1 else "RGB"
        self.decode_device = None if self.settings.decode_device is None else torch.device(self.settings.decode_device)
        if self.decode_device is not None:  # workers read bytes and draw boxes; the batch decodes on the device
            from sslpipe.data.gpu_decode import EncodedCrops, require_device

            require_device(self.decode_device)
            transform = EncodedCrops(self.crops, self.settings.crop_ratio)
        elif self.crops is None:
            transform = EvalCrop(self.settings.image_size, self.settings.crop_ratio, mode)
        else:
            transform = TrainCrops(self.crops, mode)
        self.dataset = FileDataset(self.split, transform, self.seed, self.settings.skip_bad)
        self.across_epochs = self.across_epochs and self.crops is not None  # an eval pass reads its split once
        self.sampler = OrderSampler(len(self.split), self.batch_size, self.shuffle, self.drop_last, self.seed,
                                    self.rank, self.world_size, endless=self.across_epochs)
        if self.drop_last and len(self) == 0:
            raise ValueError(f"batch_size={self.batch_size} is larger than the {len(self.split) // self.world_size} "
                             f"training images per rank; lower the batch size")
        self.workers = worker_count(self.settings.workers)
        self._loader = None
        self._live, self._at = None, None  # the running batch iterator and the (epoch, batch) it yields next
        if self.crops is not None:
            log.info("stream loader, rank %d of %d: %d of %d images per epoch (%d batches of %d), %d workers, "
                     "decode on %s", self.rank, self.world_size, len(self) * self.batch_size if self.drop_last
                     else len(self.split) // self.world_size, len(self.split), len(self), self.batch_size,
                     self.workers, self.decode_device or "the workers")

    def loader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:  # built on first use: workers start once, then persist across epochs
            extra = {"persistent_workers": True, "prefetch_factor": self.settings.prefetch} if self.workers else {}
            # its own generator: starting the workers must not draw from the global RNG, which the
            # on-device augmentation uses and a checkpoint restores (resume stays bitwise exact)
            if self.decode_device is not None:
                from sslpipe.data.gpu_decode import collate_encoded

                extra["collate_fn"] = collate_encoded
            self._loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler,
                                                       num_workers=self.workers, pin_memory=self.pin_memory,
                                                       generator=torch.Generator().manual_seed(self.seed), **extra)
        return self._loader

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.epoch, self.sampler.start = epoch, start

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch()

    def __iter__(self):
        here = (self.sampler.epoch, self.sampler.start)
        if self._live is None or self._at != here or not self.across_epochs:
            self.close()
            self._live, self._at = self._batches(), here
            if self.crops is not None:
                log.info("stream loader: reading from epoch %d, batch %d", *here)
        per_epoch = self.sampler.batches_per_epoch()
        for _ in range(per_epoch - self.sampler.start):
            batch = next(self._live)
            epoch, b = self._at
            self._at = (epoch + 1, 0) if b + 1 == per_epoch else (epoch, b + 1)
            yield batch

    def _batches(self):
        """(views, labels) from the sampler's (epoch, start) on: one epoch, or on through the
        following ones when the sampler is endless."""
        batches = iter(self.loader())
        if self.decode_device is not None:
            from sslpipe.data.gpu_decode import DecodedBatches, view_sizes

            batches = iter(DecodedBatches(batches, view_sizes=view_sizes(self.crops, self.settings.image_size),
                                          channels=self.split.channels, device=self.decode_device,
                                          ahead=self.settings.decode_ahead))
        return _yield_batches(batches, eval_view=self.crops is None, decoded=self.decode_device is not None)

    def close(self) -> None:
        """Stop the running batch iterator (its decode threads; the workers persist)."""
        if self._live is not None:
            self._live.close()
        self._live, self._at = None, None
