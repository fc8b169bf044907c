"""torchvision's readers on the real on-disk formats, read once into memory."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from sslpipe.data import Split, Splits, resize_uint8, to_uint8_nchw


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
    images = resize_uint8(to_uint8_nchw(train.data), image_size)
    labels = torch.as_tensor(train.targets, dtype=torch.long)
    full = Split(images, labels)
    test_split = Split(resize_uint8(to_uint8_nchw(test.data), image_size), torch.as_tensor(test.targets, dtype=torch.long))
    if val_size:
        index = np.arange(len(full))
        tr, va = train_test_split(index, test_size=val_size, stratify=labels.numpy(), random_state=split_seed)
        return Splits(train=full.subset(np.sort(tr)), val=full.subset(np.sort(va)), test=test_split, classes=list(train.classes))
    return Splits(train=full, test=test_split, classes=list(train.classes))
