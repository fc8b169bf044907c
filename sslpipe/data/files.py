"""Image files on disk, listed fast and held compactly: the streaming path's file table.

- `PathTable`: N paths as one uint8 buffer + offsets. A Python list of 1.28M `str` is
  about 150 MB of small objects whose reference counts DataLoader workers touch, so every
  forked worker slowly copies the whole list (copy-on-write); two numpy arrays are never
  written to and stay shared.
- `list_class_folders`: a class-per-folder tree listed with `os.scandir` in a thread pool,
  one class folder per task (directory reads release the GIL), recursing like torchvision's
  `make_dataset`. Written by hand: torchvision's `make_dataset` walks in one thread and
  builds a list of tuples.
- `cached_listing`: the listing saved once as an `.npz` index (beside the data if the folder
  is writable, else in `index_dir`) and reused while the tree is unchanged: the fingerprint is
  the class list and the modification time of every class folder, which changes when a file
  is added, removed or renamed in it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS, lower case
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INDEX_VERSION = 1


class PathTable:
    """Immutable table of paths under one root: `table[i]` is the full path as a str."""

    def __init__(self, root: str, data: np.ndarray, offsets: np.ndarray):
        self.root, self.data, self.offsets = str(root), data, offsets

    @classmethod
    def from_relative(cls, root: str, relpaths: list[str]) -> "PathTable":
        encoded = [p.encode("utf-8", "surrogateescape") for p in relpaths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        return cls(root, data, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def relative(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, i: int) -> str:
        return os.path.join(self.root, self.relative(int(i)))

    def subset(self, index) -> "PathTable":
        index = np.asarray(index, dtype=np.int64)
        starts, ends = self.offsets[index], self.offsets[index + 1]
        lengths = ends - starts
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # gather the byte ranges in one vectorised pass
        take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return PathTable(self.root, self.data[take], offsets)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes


@dataclass(frozen=True)
class ReadSettings:
    """How a split's files are read: part of the split, so every stage reads it the same way."""

    image_size: int
    channels: int = 3
    crop_ratio: float = 0.875      # eval view: shorter side to image_size / crop_ratio, centre crop
    workers: int | str = "auto"   # DataLoader workers per rank; auto: the CPUs this rank has, less one
    skip_bad: bool = False        # unreadable image: error naming it (default), or warn and read the next one
    prefetch: int = 4             # batches each worker keeps ready
    decode_device: str | None = None  # "cuda": JPEGs decoded on the GPU (sslpipe.data.gpu_decode); None: in workers
    decode_ahead: int = 2         # with decode_device: batches decoded ahead in background threads; 0: in series


@dataclass
class FileSplit:
    """A split kept on disk: image files and their labels (-1: unlabelled). The streaming
    counterpart of `sslpipe.data.Split`, decoded per sample by `sslpipe.data.stream`."""

    paths: PathTable
    labels: torch.Tensor  # int64 (N,)
    channels: int = 3
    settings: ReadSettings | None = None  # how every stage reads it (image size, eval crop, workers)

    def __post_init__(self):
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} files but {len(self.labels)} labels")

    masks = None  # no segmentation masks on the streaming path

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "FileSplit":
        index = np.asarray(torch.as_tensor(index, dtype=torch.long).numpy())
        return FileSplit(self.paths.subset(index), self.labels[torch.from_numpy(index)], self.channels, self.settings)

    def with_settings(self, settings: ReadSettings) -> "FileSplit":
        return FileSplit(self.paths, self.labels, self.channels, settings)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_class(folder: str, prefix: str) -> tuple[bytes, int]:
    """The image files under `folder`, recursively (symlinks followed, as torchvision does), as
    one NUL-separated byte string of `prefix/<relative path>`, sorted, and their count. Names
    with an image extension are taken as files without a stat; others are checked for being a
    folder (to recurse). One `listdir` per folder and no per-file objects beyond the names:
    at 1.28M files the per-entry Python work, not the file system, was the cost."""
    found: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        here = os.path.join(folder, rel)
        for name in os.listdir(here):
            path = os.path.join(rel, name) if rel else name
            if _is_image(name):
                found.append(path)
            elif os.path.isdir(os.path.join(here, name)):
                stack.append(path)
    found.sort()
    return "\0".join(prefix + f for f in found).encode("utf-8", "surrogateescape"), len(found)


def list_class_folders(folder: str, classes: list[str], threads: int = 8) -> tuple[PathTable, np.ndarray]:
    """(paths relative to `folder`, int64 labels) of every image in `folder/<class>/...`,
    classes in the given order, files sorted within a class. Class folders are read by a
    thread pool (listdir releases the GIL: on a network file system the reads overlap)."""
    import gc

    gc.disable()  # millions of short-lived strings would trigger the cyclic collector again and again
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(classes)))) as pool:
            scanned = list(pool.map(_scan_class, [os.path.join(folder, c) for c in classes],
                                    [c + os.sep for c in classes]))
    finally:
        gc.enable()
    counts = np.array([n for _, n in scanned], dtype=np.int64)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    raw = np.frombuffer(b"\0".join(blob for blob, n in scanned if n), dtype=np.uint8)
    if not len(labels):
        return PathTable(folder, np.zeros(0, np.uint8), np.zeros(1, np.int64)), labels
    separators = np.flatnonzero(raw == 0)  # NUL never occurs in a path
    starts = np.concatenate([[0], separators + 1]) - np.arange(len(labels))  # positions once NULs are gone
    offsets = np.append(starts, len(raw) - len(separators)).astype(np.int64)
    return PathTable(folder, np.delete(raw, separators), offsets), labels


def _fingerprint(folder: str, classes: list[str]) -> np.ndarray:
    """mtime_ns of each class folder: a file added, removed or renamed in one changes it (class
    folders added or removed change the class list, compared too). Not seen: files replaced in
    place under the same name, and changes inside nested subfolders; delete the index
    (`.sslpipe-index.npz`) to force a rescan."""
    return np.array([os.stat(os.path.join(folder, c)).st_mtime_ns for c in classes], dtype=np.int64)


def _index_paths(folder: str, index_dir: str | None) -> list[Path]:
    digest = hashlib.sha1(os.path.realpath(folder).encode()).hexdigest()[:16]
    beside = Path(folder) / ".sslpipe-index.npz"
    return [beside] + ([Path(index_dir) / f"{digest}.npz"] if index_dir else [])


def cached_listing(folder: str, classes: list[str], index_dir: str | None = None) -> tuple[PathTable, np.ndarray]:
    """`list_class_folders(folder, classes)`, read from an index written by an earlier call
    while the tree is unchanged; the first call writes the index (beside the data if writable,
    else under `index_dir`)."""
    fingerprint = _fingerprint(folder, classes)
    candidates = _index_paths(folder, index_dir)
    for path in candidates:
        try:
            with np.load(path, allow_pickle=False) as saved:
                if (int(saved["version"]) == INDEX_VERSION and list(saved["classes"]) == list(classes)
                        and np.array_equal(saved["fingerprint"], fingerprint)):
                    log.info("file index %s: %d images (tree unchanged)", path, len(saved["labels"]))
                    return PathTable(folder, saved["data"], saved["offsets"]), saved["labels"]
        except (OSError, KeyError, ValueError):
            continue
    table, labels = list_class_folders(folder, classes)
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, version=INDEX_VERSION, classes=np.array(classes), fingerprint=fingerprint,
                     data=table.data, offsets=table.offsets, labels=labels)
            os.replace(tmp, path)  # atomic: a reader never sees half an index
            log.info("file index written: %s (%d images)", path, len(labels))
            break
        except OSError:
            continue
    return table, labels


def require_files(dataset: str, root: str, relpaths: list[str], hint: str) -> None:
    """Fail before reading when files are missing: name the root, each missing file, and the fix."""
    missing = [p for p in relpaths if not (Path(root) / p).exists()]
    if missing:
        shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        raise FileNotFoundError(f"{dataset}: missing under root='{root}': {shown}. {hint}")
