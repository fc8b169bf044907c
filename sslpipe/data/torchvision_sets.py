"""torchvision's readers on the real on-disk formats, read once into memory."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from sslpipe.data.files import require_files

from sslpipe.data.split import Split, Splits, resize_uint8, to_uint8_nchw


def _cifar_class(variant: str):
    from torchvision import datasets

    readers = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
    if variant not in readers:
        raise ValueError(f"unknown CIFAR variant '{variant}'; valid: {sorted(readers)}")
    return readers[variant]


def load_cifar(variant: str, root: str, download: bool = False, image_size: int = 32, val_size: int = 5000,
               split_seed: int = 0) -> Splits:
    """CIFAR-10/100 from the python-pickle batches (md5-checked by torchvision); `val_size`
    train images are held out, stratified, as the validation split."""
    reader = _cifar_class(variant)
    try:
        train = reader(root=root, train=True, download=download)
        test = reader(root=root, train=False, download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{variant}: no valid data under root='{root}' ({err}). Put the extracted "
            f"'{reader.base_folder}' folder there, or set dataset.download=true."
        ) from None
    full = Split(resize_uint8(to_uint8_nchw(train.data), image_size), torch.as_tensor(train.targets, dtype=torch.long))
    test_split = Split(resize_uint8(to_uint8_nchw(test.data), image_size), torch.as_tensor(test.targets, dtype=torch.long))
    return _hold_out_val(full, test_split, list(train.classes), val_size, split_seed)


def _hold_out_val(full: Split, test: Split, classes: list[str], val_size: int, split_seed: int,
                  unlabeled: Split | None = None) -> Splits:
    """`val_size` images of `full` held out, stratified, as the validation split (0: none)."""
    if not val_size:
        return Splits(train=full, test=test, classes=classes, unlabeled=unlabeled)
    index = np.arange(len(full))
    tr, va = train_test_split(index, test_size=val_size, stratify=full.labels.numpy(), random_state=split_seed)
    return Splits(train=full.subset(np.sort(tr)), val=full.subset(np.sort(va)), test=test, classes=classes,
                  unlabeled=unlabeled)


# ------------------------------------------------------------------ STL-10
def load_stl10(root: str, download: bool = False, image_size: int = 96, val_size: int = 500,
               use_unlabeled: bool = True, split_seed: int = 0) -> Splits:
    """STL-10 from the binary files in `<root>/stl10_binary` (md5-checked by torchvision):
    5k labelled train, 8k test, and the 100k unlabelled images as `Splits.unlabeled` for
    pretraining (2.7 GB in memory at 96 px; `use_unlabeled=false` skips them)."""
    from torchvision.datasets import STL10

    def read(split: str) -> STL10:
        try:
            return STL10(root=root, split=split, download=download)
        except RuntimeError as err:
            files = [f"{STL10.base_folder}/{name}" for name, _ in STL10.train_list + STL10.test_list]
            require_files("stl10", root, files, "Extract stl10_binary.tar.gz there, or set dataset.download=true.")
            raise FileNotFoundError(f"stl10: the files under root='{root}/{STL10.base_folder}' fail torchvision's "
                                    f"md5 check ({err}); re-extract them or set dataset.download=true.") from None

    def split_of(ds: STL10) -> Split:  # torchvision keeps STL-10 as (N, C, H, W) already
        return Split(resize_uint8(torch.from_numpy(np.ascontiguousarray(ds.data)), image_size),
                     torch.as_tensor(ds.labels, dtype=torch.long))

    train, test = read("train"), read("test")
    unlabeled = split_of(read("unlabeled")) if use_unlabeled else None
    return _hold_out_val(split_of(train), split_of(test), list(train.classes), val_size, split_seed, unlabeled)


# ------------------------------------------------------------------ MNIST, Fashion-MNIST
def load_mnist(variant: str, root: str, download: bool = False, image_size: int = 28, val_size: int = 5000,
               split_seed: int = 0) -> Splits:
    """MNIST or Fashion-MNIST from the idx files wherever `root` has them: the four files,
    gzipped as the authors ship them or plain, in `root` itself, or in torchvision's
    `<root>/<MNIST|FashionMNIST>/raw` (see sslpipe.data.idx, which parses them by hand).
    `download=true` fetches them with torchvision into that raw folder when none are found."""
    from torchvision import datasets

    from sslpipe.data.idx import locate_idx_files, read_idx_pair

    readers = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
    if variant not in readers:
        raise ValueError(f"unknown MNIST variant '{variant}'; valid: {sorted(readers)}")
    reader = readers[variant]
    folder = reader.__name__  # torchvision's folder: MNIST, FashionMNIST
    try:
        files = locate_idx_files(variant, root, folder, "Put them there, or set dataset.download=true.")
    except FileNotFoundError:
        if not download:
            raise
        reader(root=root, train=True, download=True)  # fetches all four into <root>/<folder>/raw
        files = locate_idx_files(variant, root, folder)
    classes = list(reader.classes)

    def split_of(prefix: str) -> Split:
        images, labels = read_idx_pair(*files[prefix], num_classes=len(classes))
        return Split(resize_uint8(torch.from_numpy(images).unsqueeze(1).contiguous(), image_size),
                     torch.from_numpy(labels))

    return _hold_out_val(split_of("train"), split_of("t10k"), classes, val_size, split_seed)
