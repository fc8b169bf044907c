"""A class-per-folder image tree (torchvision's ImageFolder layout), read once into memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split

from sslpipe.data import Split, Splits


def _resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size` (bilinear), then the central size x size square."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _read_folder(folder: Path, classes: list[str], image_size: int, channels: int) -> Split:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    samples = make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS,
                           allow_empty=True)
    if not samples:
        raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMG_EXTENSIONS)}) under '{folder}/<class>/'")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for path, _ in samples:
        with Image.open(path) as im:
            images.append(_resize_center_crop(im.convert(mode), image_size))
    array = np.stack(images)
    array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)
    return Split(torch.from_numpy(np.ascontiguousarray(array)), torch.as_tensor([c for _, c in samples], dtype=torch.long))


def _classes(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"imagefolder: '{folder}' has no class folders (expected '{folder}/<class>/<image>')")
    return classes


def load_imagefolder(root: str, image_size: int, num_classes: int, channels: int = 3, train_dir: str = "train", val_dir: str = "val",
                     test_dir: str = "test", val_ratio: float = 0.1, test_ratio: float = 0.2, split_seed: int = 0) -> Splits:
    """`<root>/<train_dir>/<class>/*.png|jpg|...`; `<root>/<val_dir>` and `<root>/<test_dir>` with
    the same class folders where they exist, else held out from train, stratified, by
    `val_ratio` / `test_ratio`. Class indices follow the sorted train class folder names.
    With `train_dir: .` the class folders sit directly under root and both splits are held out."""
    base = Path(root)
    train_path = base / train_dir
    if not train_path.is_dir():
        raise FileNotFoundError(f"imagefolder: missing under root='{root}': {train_dir}/<class>/<image> "
                                f"(set dataset.source.train_dir, or dataset.root)")
    classes = _classes(train_path)
    reserved = {val_dir, test_dir} if train_dir in (".", "") else set()
    classes = [c for c in classes if c not in reserved]
    if len(classes) != num_classes:
        raise ValueError(f"imagefolder: {train_path} has {len(classes)} class folders ({', '.join(classes[:10])}) "
                         f"but dataset.num_classes={num_classes}; set dataset.num_classes={len(classes)}")
    train = _read_folder(train_path, classes, image_size, channels)
    total = len(train)

    def held_out(split: Split, ratio: float, name: str) -> tuple[Split, Split | None]:
        folder = base / (val_dir if name == "val" else test_dir)
        if folder.is_dir() and folder != train_path:
            unknown = sorted(set(_classes(folder)) - set(classes))
            if unknown:
                raise ValueError(f"imagefolder: {folder} has class folders not in {train_path}: {unknown}")
            return split, _read_folder(folder, classes, image_size, channels)
        if not ratio:
            return split, None
        index = np.arange(len(split))
        count = max(1, round(ratio * total))  # ratios are shares of all the images
        keep, out = train_test_split(index, test_size=count, stratify=split.labels.numpy(), random_state=split_seed)
        return split.subset(np.sort(keep)), split.subset(np.sort(out))

    train, test = held_out(train, test_ratio, "test")
    if test is None:
        raise ValueError(f"imagefolder: no '{test_dir}' folder under '{root}' and test_ratio=0; one of them is needed")
    train, val = held_out(train, val_ratio, "val")
    return Splits(train=train, val=val, test=test, classes=classes)
