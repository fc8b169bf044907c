"""Reading WebDataset shard sets written by `python -m sslpipe.data.shard`:
`dataset=shards dataset.root=<out dir>` -> `load_shards` -> `Splits` of `ShardSplit`s, which
`ShardLoader` batches (the `StreamLoader` interface; its docstring states what it guarantees
about order, coverage, randomness and resume)."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslpipe.data.split import Splits
from sslpipe.data.files import FileSplit, PathTable, ReadSettings
from sslpipe.data.stream import BadImageError, EvalCrop, LoaderOptions, TrainCrops, sample_generator, worker_count

log = logging.getLogger(__name__)

FORMAT = "sslpipe-shards"
VERSION = 1
SPLIT_NAMES = ("train", "val", "test")


class ShardError(ValueError):
    """A shard set that is missing, incomplete or inconsistent with its index."""


@dataclass(frozen=True)
class ShardReadSettings(ReadSettings):
    """ReadSettings plus the shard reader's shuffle buffer (samples per worker)."""

    shuffle_buffer: int = 1000


class ShardSplit(FileSplit):
    """Samples of one shard set (all of it, or a subset: held out, data ratio, label
    fraction). A `FileSplit` to every stage (streamed: `is_streamed` is true, features are
    fingerprinted by `paths`), whose `paths` name each image member as
    `<shard set>/<shard>.tar/<key>.<ext>`; the bytes are read at `offsets` / `sizes` inside
    `shard_files[shard]`. Batched by `ShardLoader`, never by `StreamLoader`."""

    def __init__(self, root: str, shard_files: list[str], shard: np.ndarray, offsets: np.ndarray,
                 sizes: np.ndarray, paths: PathTable, labels: torch.Tensor, channels: int = 3,
                 settings: ReadSettings | None = None):
        super().__init__(paths, labels, channels, settings)
        self.root, self.shard_files = str(root), list(shard_files)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.offsets, self.sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)

    def subset(self, index) -> "ShardSplit":
        index = np.asarray(torch.as_tensor(index, dtype=torch.long).numpy())
        return ShardSplit(self.root, self.shard_files, self.shard[index], self.offsets[index], self.sizes[index],
                          self.paths.subset(index), self.labels[torch.from_numpy(index)], self.channels,
                          self.settings)

    def with_settings(self, settings: ReadSettings) -> "ShardSplit":
        return ShardSplit(self.root, self.shard_files, self.shard, self.offsets, self.sizes, self.paths, self.labels,
                          self.channels, settings)

    def read_bytes(self, i: int, handle: dict | None = None) -> bytes:
        """Image member `i`'s bytes (one seek + read; `handle` caches the open shard file)."""
        handle = {} if handle is None else handle
        path = os.path.join(self.root, self.shard_files[self.shard[i]])
        if handle.get("path") != path:
            if handle.get("file"):
                handle["file"].close()
            try:
                handle["file"], handle["path"] = open(path, "rb"), path
            except OSError as err:
                raise BadImageError(f"cannot open shard {path}: {err}") from None
        f = handle["file"]
        f.seek(int(self.offsets[i]))
        data = f.read(int(self.sizes[i]))
        if len(data) != self.sizes[i]:
            raise BadImageError(f"shard {path} is truncated: {self.paths.relative(int(i))} needs "
                                f"{self.sizes[i]} bytes at offset {self.offsets[i]}, got {len(data)}")
        return data


def read_index(folder: Path) -> dict:
    path = folder / "index.json"
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"shards: missing {path} (write shards with "
                                f"`python -m sslpipe.data.shard <image folder> {folder.parent}`)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"shards: cannot read {path}: {err}") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"shards: {path} is not a {FORMAT} v{VERSION} index "
                         f"(format={index.get('format')!r}, version={index.get('version')!r})")
    return index


def shard_split(folder: Path, channels: int = 3, classes: list[str] | None = None) -> ShardSplit:
    """The whole shard set in `folder` (its index.json), in shard order. Shards that are
    missing or whose size differs from the index fail here, naming the file."""
    index = read_index(folder)
    if classes is not None and index["classes"] != classes:
        raise ValueError(f"shards: {folder}/index.json has classes {index['classes'][:10]}, the train set "
                         f"{classes[:10]}; write all splits in one run of python -m sslpipe.data.shard")
    files, shard, offsets, sizes, labels, names = [], [], [], [], [], []
    for k, s in enumerate(index["shards"]):
        path = folder / s["name"]
        if not path.is_file():
            raise FileNotFoundError(f"shards: missing {path} (listed in {folder}/index.json)")
        if path.stat().st_size != s["bytes"]:
            raise ValueError(f"shards: {path} has {path.stat().st_size} bytes, index.json says {s['bytes']} "
                             f"(truncated or replaced; write the shards again)")
        files.append(s["name"])
        shard.append(np.full(s["count"], k, dtype=np.int32))
        offsets.append(np.asarray(s["offsets"], dtype=np.int64))
        sizes.append(np.asarray(s["sizes"], dtype=np.int64))
        labels.append(np.asarray(s["labels"], dtype=np.int64))
        names += [f"{s['name']}/{key}.{ext}" for key, ext in zip(s["keys"], s["exts"])]
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return ShardSplit(str(folder), files, cat(shard, np.int32), cat(offsets, np.int64), cat(sizes, np.int64),
                      PathTable.from_relative(str(folder), names), torch.from_numpy(cat(labels, np.int64)), channels)


def load_shards(root: str, image_size: int, num_classes: int | None = None, channels: int = 3,
                val_ratio: float = 0.1, test_ratio: float = 0.2, split_seed: int = 0, loader: str = "stream",
                eval_crop_ratio: float = 0.875, workers: int | str = "auto", skip_bad_images: bool = False,
                shuffle_buffer: int = 1000) -> Splits:
    """The splits of the shard sets under `root` (`<root>/train/index.json` required, val/ and
    test/ where written). Like imagefolder: without a test set the val set is the test split;
    a split that has no shard set is held out from train at sample level (stratified,
    `val_ratio` / `test_ratio` of all train samples), read by seeking to the recorded offsets."""
    from sklearn.model_selection import train_test_split

    if loader not in ("auto", "stream"):
        raise ValueError(f"shards: dataset.loader='{loader}'; shards are streamed (auto or stream); "
                         f"for the memory path read the image folder with dataset=imagefolder")
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"shards: dataset.root='{root}' is not a folder (expected <root>/train/index.json "
                                f"and shard-*.tar written by python -m sslpipe.data.shard)")
    if not (base / "train" / "index.json").is_file():
        hint = " (dataset.root is the folder above train/)" if (base / "index.json").is_file() else ""
        raise FileNotFoundError(f"shards: missing under root='{root}': train/index.json{hint}; write shards with "
                                f"`python -m sslpipe.data.shard <image folder> {root}`")
    if shuffle_buffer < 0:
        raise ValueError(f"shards: dataset.shuffle_buffer={shuffle_buffer} must be >= 0")
    EvalCrop(image_size, eval_crop_ratio, "RGB")  # a bad crop ratio fails before any reading
    classes = read_index(base / "train")["classes"]
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"shards: {base / 'train'} has {len(classes)} classes ({', '.join(classes[:10])}"
                         f"{', ...' if len(classes) > 10 else ''}) but dataset.num_classes={num_classes}; "
                         f"set dataset.num_classes={len(classes)} or null (inferred)")
    settings = ShardReadSettings(image_size, channels, eval_crop_ratio, workers, skip_bad_images,
                                 shuffle_buffer=shuffle_buffer)
    train = shard_split(base / "train", channels)
    total = len(train)
    have = {name: (base / name / "index.json").is_file() for name in ("val", "test")}

    def hold_out(split: ShardSplit, ratio: float) -> tuple[ShardSplit, ShardSplit | None]:
        if not ratio:
            return split, None
        count = max(1, round(ratio * total))
        keep, out = train_test_split(np.arange(len(split)), test_size=count, stratify=split.labels.numpy(),
                                     random_state=split_seed)
        return split.subset(np.sort(keep)), split.subset(np.sort(out))

    val_name, test_name = ("val", "test") if have["test"] else (None, "val") if have["val"] else (None, None)
    if test_name is not None:
        test = shard_split(base / test_name, channels, classes)
    else:
        if not test_ratio:
            raise ValueError(f"shards: no test/ or val/ shard set under '{root}' and test_ratio=0; one is needed")
        train, test = hold_out(train, test_ratio)
    val = shard_split(base / val_name, channels, classes) if val_name else None
    if val is None:
        train, val = hold_out(train, val_ratio)
    parts = {"train": train, "val": val, "test": test}
    parts = {name: None if s is None else s.with_settings(settings) for name, s in parts.items()}
    log.info("shards %s: %d classes, train %d / val %d / test %d images", root, len(classes), len(parts["train"]),
             len(parts["val"] or []), len(parts["test"]))
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"], classes=classes, loader="stream")


# ================================================================== the loader
def _shuffle_buffer(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A shuffle buffer of `size` over a stream of n items, simulated on their positions:
    (emit order, need) where emission p takes item emit[p] after items 0..need[p]-1 of the stream
    have been read. The buffer fills with the first `size` items; then each new item replaces a
    random one of the buffer, which is emitted; at the end the rest leave in a random order."""
    if size <= 1 or n <= 1:
        return np.arange(n), np.arange(1, n + 1)
    size = min(size, n)
    emit = np.empty(n, dtype=np.int64)
    need = np.empty(n, dtype=np.int64)
    buffer = list(range(size))
    slots = rng.integers(0, size, n - size).tolist()
    for p, (t, j) in enumerate(zip(range(size, n), slots)):
        emit[p], need[p] = buffer[j], t
        buffer[j] = t
    rest = np.asarray(buffer)[rng.permutation(size)]
    emit[n - size:], need[n - size:] = rest, n
    return emit, need


class _ShardStream(torch.utils.data.IterableDataset):
    """The worker side of `ShardLoader`: yields this worker's batches of the epoch in the shared
    `state` tensor (epoch, start), which the main process sets before each iteration (shared
    memory: persistent workers see it too)."""

    def __init__(self, loader: "ShardLoader", transform, state: torch.Tensor):
        self.loader, self.transform, self.state = loader, transform, state

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, start = (int(v) for v in self.state.tolist())  # read now, when the DataLoader (re)starts this worker
        role = (worker + start) % workers  # the DataLoader asks worker 0 first: it plays the role that owns batch `start`
        return self.loader.worker_batches(epoch, start, role, workers)


@dataclass
class ShardLoader(LoaderOptions):  # split: a ShardSplit
    """The `EpochLoader` / `StreamLoader` interface over a `ShardSplit`: `batch_size`, `len()`
    (batches per epoch per rank), `set_epoch(epoch, start)`, iteration yielding (views, labels):
    views a tuple of uint8 (B, C, s, s) tensors for training crops in `crops` order, one uint8
    (B, C, s, s) tensor for the eval view (`crops=None`). A DataLoader over an IterableDataset
    whose W = max(1, workers) workers each batch their own samples (`batch_size=None`).

    What an epoch reads (all a function of seed, epoch, world_size, W and batch_size):
    - Sequence. shuffle: the shards in an order permuted by (seed, epoch), each shard's samples
      of this split in file order (so reading is sequential); no shuffle (eval): the split's own
      order, read by seeking to each sample's offset. N samples.
    - Ranks. The sequence is cut into world_size contiguous equal ranges, rank r taking
      [r * n, (r + 1) * n), where n = (N // (world_size * B)) * B with drop_last, else
      N // world_size: every rank takes the same number of steps, len() = n // B (ceil without
      drop_last). Every sample is read exactly once per epoch except the tail of the sequence,
      N mod (world_size * B) samples with drop_last (N mod world_size without), which varies
      by epoch with the shard order.
    - Workers. Global batch b of the rank comes from worker role b % W (the DataLoader takes
      batches round-robin from its workers), so role w owns batches w, w + W, ...; the rank's
      range is cut into W contiguous ranges in role order, role w's the size of its batches.
      Ranks and workers thus read disjoint samples, each from as few shards as possible: a
      contiguous run of whole shards, plus at most a part of a boundary shard at each end
      that it shares with its neighbour, the two reading disjoint sample spans by seeking to
      the recorded offsets. (No shuffle, eval: role w reads the batches w, w + W, ... themselves,
      so the batches come out in the split's order.)
    - Shuffle. Each worker passes its range through a shuffle buffer of
      `settings.shuffle_buffer` samples (default 1000; 0 or no shuffle: none) drawn by an RNG
      seeded by (seed, epoch, rank, role), and cuts the output into batches of B.
    - Crops. Sample i (its position in the split) is decoded from its bytes with PIL and cut by
      stream.py's TrainCrops with `sample_generator(seed, epoch, i)`, or EvalCrop.
    - Resume. After `set_epoch(e, start=k)` the loader yields exactly batches k.. of the
      uninterrupted epoch e (same tensors, same order): role w skips its first
      len(range(w, k, W)) batches, computed on positions alone (the buffer is simulated on
      integers; skipped samples are neither read nor decoded), and the DataLoader's worker i
      plays role (i + k) % W so that batch k comes first. Exact for the same world_size,
      workers and batch_size.
    - Bad images. An image that does not decode is an error naming its member
      (`<shard set>/<shard>.tar/<key>.<ext>`); with `settings.skip_bad` it is skipped with a
      warning and a readable image of the same batch repeats in its place (batch size kept).
    `index_labels=True` yields each sample's position in the split instead of its label (tests).
    """

    workers: int | None = None          # None: worker_count(settings.workers)
    shuffle_buffer: int | None = None   # None: settings.shuffle_buffer (1000 if the settings have none)
    index_labels: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in 0..world_size-1 (world_size={self.world_size})")
        mode = "L" if self.split.channels == 1 else "RGB"
        if self.crops is None:
            self.transform = EvalCrop(self.settings.image_size, self.settings.crop_ratio, mode)
        else:
            self.transform = TrainCrops(self.crops, mode)
        if self.workers is None:
            self.workers = worker_count(self.settings.workers)
        if self.shuffle_buffer is None:
            self.shuffle_buffer = int(getattr(self.settings, "shuffle_buffer", 1000))
        if self.drop_last and len(self) == 0:
            raise ValueError(f"batch_size={self.batch_size} is larger than the {len(self.split) // self.world_size} "
                             f"training images per rank; lower the batch size")
        # each shard's samples (positions in the split), in file order
        order = np.lexsort((self.split.offsets, self.split.shard))
        cuts = np.flatnonzero(np.diff(self.split.shard[order])) + 1
        self._by_shard = np.split(order, cuts) if len(order) else []
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._loader = None

    # ------------------------------------------------------------ the plan (same in every process)
    def per_rank(self) -> int:
        n = len(self.split)
        if self.drop_last:
            return (n // (self.world_size * self.batch_size)) * self.batch_size
        return n // self.world_size

    def __len__(self) -> int:
        n = self.per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self._state[0], self._state[1] = epoch, start

    def sequence(self, epoch: int) -> np.ndarray:
        """Positions of the whole epoch, in read order (before the rank / worker cut)."""
        if not self.shuffle:
            return np.arange(len(self.split))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x5A4D]))
        return np.concatenate([self._by_shard[k] for k in rng.permutation(len(self._by_shard))])

    def role_items(self, epoch: int, role: int, roles: int) -> np.ndarray:
        """The role's positions in stream order. shuffle: a contiguous range of the rank's range
        (roles in order, each the size of its batches); no shuffle: its batches themselves,
        b = role, role + roles, ..., so that the batches come out in the split's order."""
        batches, n, B = len(self), self.per_rank(), self.batch_size
        sequence = self.sequence(epoch)[self.rank * n:(self.rank + 1) * n]
        if not self.shuffle:
            return np.concatenate([sequence[b * B:(b + 1) * B] for b in range(role, batches, roles)] or [[]]).astype(
                np.int64)
        last = n - (batches - 1) * B  # the final batch's size (B unless not drop_last)
        sizes = [len(range(w, batches, roles)) * B - (B - last if batches and (batches - 1) % roles == w else 0)
                 for w in range(roles)]
        first = sum(sizes[:role])
        return sequence[first:first + sizes[role]]

    def role_order(self, epoch: int, role: int, roles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, emit, need): the role's positions in stream order, and the shuffle buffer's
        emission order (indices into items) and read requirement."""
        items = self.role_items(epoch, role, roles)
        size = self.shuffle_buffer if self.shuffle else 0
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, role]))
        emit, need = _shuffle_buffer(len(items), size, rng)
        return items, emit, need

    # ------------------------------------------------------------ the worker side
    def worker_batches(self, epoch: int, start: int, role: int, roles: int):
        items, emit, need = self.role_order(epoch, role, roles)
        B = self.batch_size
        skip = len(range(role, start, roles)) * B  # this role's samples in batches before `start`
        skipped = np.zeros(len(items), dtype=bool)
        skipped[emit[:skip]] = True
        held: dict[int, bytes] = {}
        handle: dict = {}
        read = 0
        try:
            for lo in range(skip, len(emit), B):
                batch = []
                for p in range(lo, min(lo + B, len(emit))):
                    while read < need[p]:  # the stream advances: read (not decode) what the buffer takes in
                        if not skipped[read]:
                            held[read] = self.split.read_bytes(int(items[read]), handle)
                        read += 1
                    batch.append((int(items[emit[p]]), held.pop(int(emit[p]))))
                yield self._collate(batch, epoch)
        finally:
            if handle.get("file"):
                handle["file"].close()

    def _decode(self, index: int, data: bytes, epoch: int):
        name = self.split.paths[index]
        try:
            image = Image.open(io.BytesIO(data))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise BadImageError(f"cannot read image {name}: {err}") from None
        with image:
            return self.transform(image, name, sample_generator(self.seed, epoch, index))

    def _collate(self, batch: list[tuple[int, bytes]], epoch: int):
        out, labels = [], []
        for index, data in batch:
            try:
                out.append(self._decode(index, data, epoch))
            except BadImageError as err:
                if not self.settings.skip_bad:
                    raise BadImageError(f"{err} (set dataset.skip_bad_images=true to skip unreadable images)") from None
                log.warning("skipped: %s; another image of the batch is repeated in its place", err)
                continue
            labels.append(index if self.index_labels else int(self.split.labels[index]))
        if not out:
            raise BadImageError(f"no readable image in a batch of {len(batch)} from {self.split.root}")
        good = len(out)
        for k in range(len(batch) - good):  # keep the batch size: repeat readable ones
            out.append(out[k % good])
            labels.append(labels[k % good])
        label_tensor = torch.tensor(labels, dtype=torch.int64)
        if self.crops is None:
            return torch.stack(out), label_tensor
        return tuple(torch.stack(views) for views in zip(*out)), label_tensor

    # ------------------------------------------------------------ the main side
    def __getstate__(self):  # what a spawned worker gets: not the DataLoader itself
        return {**self.__dict__, "_loader": None}

    def loader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:  # built on first use: workers start once and persist across epochs
            extra = {"persistent_workers": True, "prefetch_factor": self.settings.prefetch} if self.workers else {}
            plan = copy.copy(self)  # shares the split and the state tensor, not the DataLoader: no reference cycle
            plan._loader = None     # (a cycle would leave the workers to the garbage collector, whose shutdown waits)
            self._loader = torch.utils.data.DataLoader(_ShardStream(plan, self.transform, self._state),
                                                       batch_size=None, num_workers=self.workers,
                                                       pin_memory=self.pin_memory, **extra)
        return self._loader

    def __iter__(self):
        for views, labels in self.loader():
            yield (tuple(views) if isinstance(views, (list, tuple)) else views), labels
