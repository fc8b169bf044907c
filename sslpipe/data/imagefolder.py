"""Class-per-folder image trees, as people have them, read into memory or streamed.

Layouts, found with no option:
- torchvision's `ImageFolder`: `<root>/<class>/<image>`; val and test held out from it.
- ImageNet's: `<root>/train/<class>/<image>`, with `<root>/val/<class>/...` and
  `<root>/test/<class>/...` where they exist. Without a test folder the val folder is the
  test split (ImageNet results are reported on its val set) and val is held out from train.
The class count is inferred from the folders; an explicit `num_classes` that disagrees is an
error naming both.

Loaders: `memory` decodes every split once into uint8 tensors (the fast path for small sets);
`stream` keeps only the file table and decodes per sample in DataLoader workers
(`sslpipe.data.stream`); `gpu` streams too but decodes JPEGs on the GPU
(`sslpipe.data.gpu_decode`); `auto` takes memory when the decoded splits fit
`memory_budget_gb`, stream otherwise (gpu only when asked for).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from sslpipe.data.split import Split, Splits
from sslpipe.data.files import FileSplit, cached_listing
from sslpipe.data.stream import LOADERS, BadImageError, EvalCrop, ReadSettings, open_image, worker_count

log = logging.getLogger(__name__)


def _classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_layout(root: str, train_dir: str | None, val_dir: str, test_dir: str) -> tuple[Path, Path | None, Path | None]:
    """(train folder, val folder or None, test folder or None) of the tree under `root`."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"imagefolder: dataset.root='{root}' is not a folder "
                                f"(expected <root>/<class>/<image> or <root>/train/<class>/<image>)")
    if train_dir in (None, "auto"):
        train_dir = "train" if (base / "train").is_dir() and _classes(base / "train") else "."
    train = base / train_dir
    if not train.is_dir():
        raise FileNotFoundError(f"imagefolder: missing under root='{root}': {train_dir}/<class>/<image> "
                                f"(set dataset.source.train_dir, or dataset.root)")
    if train == base:  # torchvision's layout: val / test folders, if any, sit beside the classes
        found = [c for c in _classes(base) if c not in (val_dir, test_dir)]
    else:
        found = _classes(train)
    if not found:
        raise FileNotFoundError(f"imagefolder: '{train}' has no class folders (expected '{train}/<class>/<image>')")
    val, test = base / val_dir, base / test_dir
    return train, (val if val.is_dir() and val != train else None), (test if test.is_dir() and test != train else None)


def _file_split(folder: Path, classes: list[str], channels: int, index_dir: str | None) -> FileSplit:
    table, labels = cached_listing(str(folder), classes, index_dir)
    if len(table) == 0:
        raise FileNotFoundError(f"imagefolder: no images (.jpg, .jpeg, .png, ...) under '{folder}/<class>/'")
    return FileSplit(table, torch.from_numpy(labels), channels)


def decode_all(split: FileSplit, settings: ReadSettings) -> Split:
    """Every image of `split` as its eval view, uint8 (N, C, size, size), decoded by a thread
    pool (PIL releases the GIL while it decodes and resizes). Unreadable images fail naming the
    path, or with `skip_bad` are left out and counted."""
    mode = "L" if split.channels == 1 else "RGB"
    crop = EvalCrop(settings.image_size, settings.crop_ratio, mode)
    out = torch.empty((len(split), split.channels, settings.image_size, settings.image_size), dtype=torch.uint8)

    def read(i: int) -> bool:
        path = split.paths[i]
        try:
            with open_image(path) as image:
                out[i] = crop(image, path)
            return True
        except BadImageError as err:
            if not settings.skip_bad:
                raise BadImageError(f"{err} (set dataset.skip_bad_images=true to skip unreadable images)") from None
            log.warning("skipped: %s", err)
            return False

    with ThreadPoolExecutor(max_workers=worker_count(settings.workers) + 1) as pool:
        ok = np.fromiter(pool.map(read, range(len(split))), dtype=bool, count=len(split))
    if not ok.all():
        log.warning("imagefolder: %d unreadable images skipped under %s", int((~ok).sum()), split.paths.root)
        keep = torch.from_numpy(np.flatnonzero(ok))
        return Split(out[keep], split.labels[keep])
    return Split(out, split.labels)


def choose_loader(loader: str, splits: list[FileSplit], settings: ReadSettings, budget_gb: float) -> str:
    """`auto` -> memory when the decoded splits fit `budget_gb`, else stream."""
    if loader != "auto":
        return loader
    need = sum(len(s) for s in splits) * settings.channels * settings.image_size ** 2
    chosen = "memory" if need <= budget_gb * 1e9 else "stream"
    log.info("dataset.loader=auto: %d images decoded at %d px take %.2f GB, budget %.2f GB -> %s",
             sum(len(s) for s in splits), settings.image_size, need / 1e9, budget_gb, chosen)
    return chosen


def load_imagefolder(root: str, image_size: int, num_classes: int | None = None, channels: int = 3,
                     train_dir: str | None = "auto", val_dir: str = "val", test_dir: str = "test",
                     val_ratio: float = 0.1, test_ratio: float = 0.2, split_seed: int = 0, loader: str = "auto",
                     memory_budget_gb: float = 1.0, eval_crop_ratio: float = 0.875, workers: int | str = "auto",
                     skip_bad_images: bool = False, index_dir: str | None = None, decode_ahead: int = 2) -> Splits:
    """The splits of the tree under `root` (see the module docstring for layouts and loaders).
    Held-out splits are stratified; `val_ratio` / `test_ratio` are shares of all the train
    folder's images. Class indices follow the sorted class folder names."""
    if loader not in LOADERS:  # before any listing
        raise ValueError(f"dataset.loader='{loader}' is not one of: {', '.join(LOADERS)}")
    if decode_ahead < 0:
        raise ValueError(f"dataset.decode_ahead={decode_ahead}: the batches decoded ahead on the GPU must be "
                         f">= 0 (0: in series)")
    train_path, val_path, test_path = find_layout(root, train_dir, val_dir, test_dir)
    classes = _classes(train_path)
    if train_path == Path(root):
        classes = [c for c in classes if c not in (val_dir, test_dir)]
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"imagefolder: {train_path} has {len(classes)} class folders ({', '.join(classes[:10])}"
                         f"{', ...' if len(classes) > 10 else ''}) but dataset.num_classes={num_classes}; "
                         f"set dataset.num_classes={len(classes)} or null (inferred)")
    for folder in (val_path, test_path):
        if folder is not None:
            unknown = sorted(set(_classes(folder)) - set(classes))
            if unknown:
                raise ValueError(f"imagefolder: {folder} has class folders not in {train_path}: {unknown[:10]}")
    settings = ReadSettings(image_size, channels, eval_crop_ratio, workers, skip_bad_images)
    EvalCrop(image_size, eval_crop_ratio, "RGB")  # a bad crop ratio fails before any listing
    train = _file_split(train_path, classes, channels, index_dir)
    total = len(train)

    def hold_out(split: FileSplit, ratio: float) -> tuple[FileSplit, FileSplit | None]:
        if not ratio:
            return split, None
        count = max(1, round(ratio * total))
        labels = split.labels.numpy()
        counts = np.bincount(labels)
        if count >= len(classes) and counts[counts > 0].min() >= 2:
            keep, out = train_test_split(np.arange(len(split)), test_size=count, stratify=labels,
                                         random_state=split_seed)
        else:  # fewer held-out images than classes, or a class of one image: no stratified split exists
            log.warning("imagefolder: holding out %d of %d images at random (not stratified: %d classes, "
                        "smallest has %d images)", count, len(split), len(classes), int(counts[counts > 0].min()))
            out = np.random.default_rng(split_seed).choice(len(split), size=count, replace=False)
            keep = np.setdiff1d(np.arange(len(split)), out)
        return split.subset(np.sort(keep)), split.subset(np.sort(out))

    if test_path is None and val_path is not None:  # ImageNet: the val folder is what results are reported on
        test_path, val_path = val_path, None
    if test_path is not None:
        test = _file_split(test_path, classes, channels, index_dir)
    else:
        if not test_ratio:
            raise ValueError(f"imagefolder: no '{test_dir}' folder under '{root}' and test_ratio=0; one of them is needed")
        train, test = hold_out(train, test_ratio)
    val = _file_split(val_path, classes, channels, index_dir) if val_path is not None else None
    if val is None:
        train, val = hold_out(train, val_ratio)
    parts = {"train": train, "val": val, "test": test}
    kind = choose_loader(loader, [s for s in parts.values() if s is not None], settings, memory_budget_gb)
    if kind == "gpu":  # streamed, with JPEG decode and crops on the GPU (sslpipe.data.gpu_decode)
        settings = dataclasses.replace(settings, decode_device="cuda", decode_ahead=decode_ahead)
    if kind == "memory":
        parts = {name: None if s is None else decode_all(s, settings) for name, s in parts.items()}
    else:
        parts = {name: None if s is None else s.with_settings(settings) for name, s in parts.items()}
    log.info("imagefolder %s: %d classes, train %d / val %d / test %d images, loader=%s", root, len(classes),
             len(parts["train"]), len(parts["val"] or []), len(parts["test"]), kind)
    return Splits(train=parts["train"], val=parts["val"], test=parts["test"], classes=classes, loader=kind)
