"""scikit-learn's 8x8 handwritten digits: the embedded default data set (it ships with
scikit-learn, so it needs no network)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits as _sk_load_digits
from sklearn.model_selection import train_test_split

from sslpipe.data.split import Split, Splits, resize_uint8, to_uint8_nchw


def load_digits(image_size: int = 16, val_size: float = 0.15, test_size: float = 0.15, split_seed: int = 0) -> Splits:
    """1797 images, 10 classes; a fixed stratified train / val / test split."""
    bunch = _sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    labels = bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=test_size, stratify=labels, random_state=split_seed)
    train, val = train_test_split(rest, test_size=val_size / (1 - test_size), stratify=labels[rest], random_state=split_seed)
    all_images = resize_uint8(to_uint8_nchw(images), image_size)
    all_labels = torch.from_numpy(labels)
    part = lambda i: Split(all_images[np.sort(i)], all_labels[np.sort(i)])  # noqa: E731
    return Splits(train=part(train), val=part(val), test=part(test), classes=[str(d) for d in range(10)])
