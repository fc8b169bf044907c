"""MNIST / Fashion-MNIST read as their authors ship them: the four idx files gzipped in one
folder, gunzipped in one folder, or in torchvision's <root>/<MNIST|FashionMNIST>/raw, found
with no option; broken files name themselves and the fault; and the real Fashion-MNIST from
Debian's dataset-fashion-mnist package, read as installed, has the published counts and is
learnable (kNN on random features far above chance)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import rng_images, splits_of, write_idx
from torchvision.datasets import MNIST, FashionMNIST

from sslpipe.data.idx import IdxFormatError, read_idx

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs it
ON_CI = os.environ.get("CI") == "true"


def write_set(folder: Path, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """The four files in `folder` (gzipped when `gz`), in the real idx format: magic
    0x00000803 + N, 28, 28 for images, 0x00000801 + N for labels, big-endian, then the bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_x": rng_images(40, 28, 28, seed=seed), "train_y": np.arange(40) % 10,
              "test_x": rng_images(12, 28, 28, seed=seed + 1), "test_y": (np.arange(12) * 7) % 10}
    for name, key in zip(NAMES, ("train_x", "train_y", "test_x", "test_y")):
        path = folder / name
        write_idx(path, arrays[key])
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
    return arrays


def check(splits, arrays, classes) -> None:
    assert torch.equal(splits.train.images, torch.from_numpy(arrays["train_x"])[:, None])  # pixel-exact, (N, 1, 28, 28)
    assert splits.train.labels.tolist() == arrays["train_y"].tolist()
    assert torch.equal(splits.test.images, torch.from_numpy(arrays["test_x"])[:, None])
    assert splits.test.labels.tolist() == arrays["test_y"].tolist()
    assert splits.classes == list(classes) and len(splits.classes) == 10


# ------------------------------------------------------------------ the three layouts
@pytest.mark.parametrize("variant,classes", [("mnist", MNIST.classes), ("fashion_mnist", FashionMNIST.classes)],
                         ids=["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_idx_files_in_one_folder(tmp_path, variant, classes, gz):
    arrays = write_set(tmp_path / "files", gz=gz)
    splits = splits_of(f"dataset={variant}", f"dataset.root={tmp_path / 'files'}", "dataset.source.val_size=0")
    check(splits, arrays, classes)


@pytest.mark.parametrize("variant,folder,classes", [("mnist", "MNIST", MNIST.classes),
                                                    ("fashion_mnist", "FashionMNIST", FashionMNIST.classes)],
                         ids=["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_torchvision_raw_layout(tmp_path, variant, folder, classes, gz):
    arrays = write_set(tmp_path / folder / "raw", gz=gz)
    write_set(tmp_path / ("FashionMNIST" if folder == "MNIST" else "MNIST") / "raw", gz=gz, seed=9)  # the other set
    splits = splits_of(f"dataset={variant}", f"dataset.root={tmp_path}", "dataset.source.val_size=0")
    check(splits, arrays, classes)


def test_val_hold_out_keeps_every_image(tmp_path):
    arrays = write_set(tmp_path, gz=True)
    splits = splits_of("dataset=fashion_mnist", f"dataset.root={tmp_path}", "dataset.source.val_size=10")
    assert (len(splits.train), len(splits.val)) == (30, 10)
    seen = torch.cat([splits.train.images, splits.val.images]).flatten(1)
    assert sorted(map(bytes, seen.numpy())) == sorted(map(bytes, arrays["train_x"].reshape(40, -1)))
    assert sorted(torch.cat([splits.train.labels, splits.val.labels]).tolist()) == sorted(arrays["train_y"].tolist())


def test_missing_files_name_root_places_and_files(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    write_idx(tmp_path / "MNIST" / "raw" / NAMES[0], rng_images(2, 28, 28))  # one of four: not a set
    with pytest.raises(FileNotFoundError) as err:
        splits_of("dataset=mnist", f"dataset.root={tmp_path}")
    msg = str(err.value)
    assert f"root='{tmp_path}'" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert all(name in msg for name in NAMES) and "dataset.download=true" in msg


def test_download_goes_through_torchvision_into_its_raw_layout(tmp_path, monkeypatch):
    """download=true with nothing found: torchvision's own download (stubbed here: no network
    in tests) fills <root>/MNIST/raw and that is read; with files found it is not called."""
    fetched = []

    def fake_download(self):  # what torchvision leaves: the unpacked files in self.raw_folder
        fetched.append(self.raw_folder)
        arrays.update(write_set(Path(self.raw_folder), gz=False, seed=3))

    arrays: dict = {}
    monkeypatch.setattr(MNIST, "download", fake_download)
    overrides = ("dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=true", "dataset.source.val_size=0")
    splits = splits_of(*overrides)
    assert fetched == [str(tmp_path / "MNIST" / "raw")]
    check(splits, arrays, MNIST.classes)
    fetched.clear()
    splits_of(*overrides)
    assert fetched == []


# ------------------------------------------------------------------ broken files
def test_truncated_gz_names_the_file(tmp_path):
    write_set(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(IdxFormatError, match="gzip") as err:
        splits_of("dataset=fashion_mnist", f"dataset.root={tmp_path}")
    assert str(path) in str(err.value)


def test_truncated_plain_file_is_a_size_mismatch(tmp_path):
    write_set(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IdxFormatError, match="size mismatch") as err:
        splits_of("dataset=mnist", f"dataset.root={tmp_path}")
    assert str(path) in str(err.value) and "12 x 28 x 28 = 9408" in str(err.value) and "truncated" in str(err.value)


def test_wrong_magic_names_the_file(tmp_path):
    write_set(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"  # labels where the images belong: magic 0x801, not 0x803
    path.write_bytes((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(IdxFormatError, match="magic number 0x00000801, expected 0x00000803") as err:
        splits_of("dataset=fashion_mnist", f"dataset.root={tmp_path}")
    assert str(path) in str(err.value)


def test_read_idx_header_faults(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00")
    with pytest.raises(IdxFormatError, match="too short"):
        read_idx(short, 3)
    header_only = tmp_path / "header"
    header_only.write_bytes((0x803).to_bytes(4, "big") + (1).to_bytes(4, "big"))
    with pytest.raises(IdxFormatError, match="header"):
        read_idx(header_only, 3)
    not_gz = tmp_path / "x.gz"
    not_gz.write_bytes(b"not gzip at all")
    with pytest.raises(IdxFormatError, match=str(not_gz)):
        read_idx(not_gz, 1)


def test_labels_and_images_must_agree(tmp_path):
    write_set(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(11) % 10)  # 12 images, 11 labels
    with pytest.raises(IdxFormatError, match="12 images but .*t10k-labels-idx1-ubyte holds 11 labels"):
        splits_of("dataset=mnist", f"dataset.root={tmp_path}")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(12, 10))
    with pytest.raises(IdxFormatError, match="label 10 outside 0..9"):
        splits_of("dataset=mnist", f"dataset.root={tmp_path}")


# ------------------------------------------------------------------ the real Fashion-MNIST, as Debian ships it
@pytest.mark.skipif(not FASHION.is_dir() and not ON_CI,
                    reason=f"{FASHION} absent: `apt-get install dataset-fashion-mnist` (CI installs it and runs this)")
def test_real_fashion_mnist_as_shipped():
    from sslpipe.stages.knn import knn_classify

    if not FASHION.is_dir():
        pytest.fail(f"CI=true but {FASHION} is absent: .ci/run installs Debian's dataset-fashion-mnist for this test")
    assert sorted(p.name for p in FASHION.glob("*ubyte*")) == sorted(f"{n}.gz" for n in NAMES)  # only the .gz
    splits = splits_of("dataset=fashion_mnist", f"dataset.root={FASHION}")
    train = torch.cat([splits.train.images, splits.val.images])
    train_y = torch.cat([splits.train.labels, splits.val.labels])
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    assert train.shape == (60000, 1, 28, 28) and splits.test.images.shape == (10000, 1, 28, 28)
    assert splits.classes == list(FashionMNIST.classes)
    assert torch.bincount(train_y, minlength=10).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert torch.bincount(splits.test.labels, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(splits.val.labels, minlength=10).tolist() == [500] * 10  # stratified hold-out

    # Fixed random features (a seeded linear map of the 784 pixels to 256-d, ReLU) and the
    # kNN probe's own cosine kNN (k=20): chance is 0.1, kNN on raw pixels about 0.85.
    torch.manual_seed(0)
    weight = torch.randn(784, 256) / 28

    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.relu(((images.flatten(1).float() / 255 - 0.286) / 0.353) @ weight)

    pred = knn_classify(features(train), train_y, features(splits.test.images), num_classes=10, k=20,
                        temperature=0.07)
    accuracy = (pred == splits.test.labels).float().mean().item()
    print(f"Fashion-MNIST kNN (k=20) on random 256-d features: test accuracy {accuracy:.4f}")
    assert accuracy > 0.6, f"kNN accuracy {accuracy:.4f} on the real Fashion-MNIST, chance is 0.1"
