"""MNIST-family idx files in the layouts people have them.

The idx format (LeCun's MNIST page; Zalando kept it for Fashion-MNIST) is a 4-byte magic
number - two zero bytes, the element type (0x08: unsigned byte) and the number of
dimensions - then one big-endian uint32 per dimension, then the data, row-major. The
parser here is written by hand with numpy because torchvision's reader wants its own folder
layout (`<root>/<MNIST|FashionMNIST>/raw`, uncompressed files): it cannot read the `.gz`
files as the authors ship them (and as Debian's `dataset-fashion-mnist` installs them in
/usr/share/datasets/fashion-mnist), nor plain files sitting in one folder.

Layouts read, with no option to pick one (`dataset.root` is the folder or torchvision's root):
  1. `<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`  (as downloaded / packaged)
  2. `<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte`     (gunzipped in place)
  3. `<root>/<MNIST|FashionMNIST>/raw/<the same names>`         (torchvision's download)
Each file may be plain or `.gz` in any of them; where both are there the plain one is read.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

UBYTE = 0x08  # the idx element type for unsigned bytes, the only one MNIST-family files use
PREFIXES = ("train", "t10k")
FILES = {prefix: (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte") for prefix in PREFIXES}


class IdxFormatError(ValueError):
    """An idx file that is there but is not a valid idx file (names the file and the fault)."""


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array in one idx file (plain, or gzip when the name ends in `.gz`) whose
    magic number says unsigned bytes in `ndim` dimensions (3: images, 1: labels)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # truncated or not a gzip stream
        raise IdxFormatError(f"{path}: not a complete gzip stream ({type(err).__name__}: {err})") from None
    magic_expected = (UBYTE << 8) | ndim
    if len(data) < 4:
        raise IdxFormatError(f"{path}: {len(data)} bytes, too short for the 4-byte idx magic number "
                             f"(expected 0x{magic_expected:08x})")
    magic = int.from_bytes(data[:4], "big")
    if magic != magic_expected:
        raise IdxFormatError(f"{path}: magic number 0x{magic:08x}, expected 0x{magic_expected:08x} "
                             f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); not this idx file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{path}: {len(data)} bytes, shorter than the {header}-byte header of a "
                             f"{ndim}-dimensional idx file")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != size:
        raise IdxFormatError(f"{path}: size mismatch: the header says {' x '.join(map(str, dims))} = {size} "
                             f"bytes of data, the file has {len(data) - header} after the header "
                             f"({'truncated' if len(data) - header < size else 'trailing bytes'})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable for torch


def _places(root: str | Path, folder: str) -> list[Path]:
    root = Path(root)
    return [root, root / folder / "raw"]


def _find(place: Path, name: str) -> Path | None:
    for candidate in (place / name, place / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate_idx_files(dataset: str, root: str | Path, folder: str, hint: str = "") -> dict[str, tuple[Path, Path]]:
    """{"train": (images, labels), "t10k": (images, labels)} from the first place under `root`
    that holds all four files (plain or .gz): `root` itself, then `root/<folder>/raw`.
    FileNotFoundError names root, each place looked in with what it lacks, and the names."""
    looked = []
    for place in _places(root, folder):
        found = {prefix: tuple(_find(place, name) for name in names) for prefix, names in FILES.items()}
        if all(p is not None for pair in found.values() for p in pair):
            return found
        missing = [name for prefix, names in FILES.items() for name, p in zip(names, found[prefix]) if p is None]
        looked.append(f"{place} ({'missing ' + ', '.join(missing) if place.is_dir() else 'no such folder'})")
    expected = ", ".join(f"{name}[.gz]" for names in FILES.values() for name in names)
    raise FileNotFoundError(f"{dataset}: no complete set of idx files under root='{root}'. Looked in: "
                            f"{'; '.join(looked)}. Expected the four files {expected} (gzipped as shipped, or "
                            f"plain) together in one of those folders. {hint}".rstrip())


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W) and int64 labels (N,) from one images/labels file pair, checked
    against each other (same N) and against the class count."""
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise IdxFormatError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and int(labels.max()) >= num_classes:
        raise IdxFormatError(f"{labels_path}: label {int(labels.max())} outside 0..{num_classes - 1}")
    return images, labels.astype(np.int64)
