"""Every data set's reader on small files written in the real on-disk format: the right pixels
and labels come back, missing files name the root and the files, and the label fraction and
data ratio keep what they say."""

from __future__ import annotations

import gzip  # noqa: F401 - torchvision reads the raw idx files; gz is only its download format
import hashlib
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from sslpipe.config import build, compose
from sslpipe.stages.build import build_splits
from sslpipe.stages.context import Context

CONF = Path(__file__).resolve().parents[1] / "conf"
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def rng_images(n: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def splits_of(*overrides: str):
    return build(compose(list(overrides)).dataset.source)


def context(*overrides: str) -> Context:
    return Context(compose(list(overrides)), Path("."), torch.device("cpu"), tracker=None)


# ------------------------------------------------------------------ every yaml
@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_yaml_has_the_common_keys(name):
    ds = OmegaConf.load(CONF / "dataset" / f"{name}.yaml")
    for key in ("name", "root", "download", "fraction", "data_ratio", "image_size", "channels", "num_classes",
                "source", "norm", "augment"):
        assert key in ds, f"{name}.yaml lacks {key}"
    assert ds.data_ratio == 1.0 and ds.fraction == 1.0
    assert len(ds.norm.mean) == len(ds.norm.std) == ds.channels


# ------------------------------------------------------------------ CIFAR-10 (python pickle batches)
def write_cifar10(root: Path, monkeypatch, per_batch: int = 20, n_test: int = 10):
    """cifar-10-batches-py as the tarball unpacks it: data_batch_1..5 and test_batch (dicts of a
    uint8 (N, 3072) `data` and a `labels` list) and batches.meta (`label_names`)."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": (rng_images(per_batch, 3072, seed=10 + i), [(i + j) % 10 for j in range(per_batch)])
               for i in range(1, 6)}
    batches["test_batch"] = (rng_images(n_test, 3072, seed=20), [(3 * j) % 10 for j in range(n_test)])
    for name, (data, labels) in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"k{i}" for i in range(10)], "num_vis": 3072}, f)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5(folder / "batches.meta")})
    return batches


def test_cifar10_reads_pickle_batches_and_holds_out_val(tmp_path, monkeypatch):
    batches = write_cifar10(tmp_path, monkeypatch)
    train_data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    splits = splits_of("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.source.val_size=0")
    assert torch.equal(splits.train.images, torch.from_numpy(train_data.reshape(-1, 3, 32, 32)))  # R, G, B planes
    assert splits.train.labels.tolist() == train_labels
    assert torch.equal(splits.test.images, torch.from_numpy(batches["test_batch"][0].reshape(-1, 3, 32, 32)))
    assert splits.test.labels.tolist() == batches["test_batch"][1]
    assert splits.classes == [f"k{i}" for i in range(10)]
    # the yaml's stratified hold-out: val_size images, every class in it, none also in train
    held = splits_of("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.source.val_size=20")
    assert len(held.val) == 20 and len(held.train) == 80
    assert sorted(Counter(held.val.labels.tolist()).values()) == [2] * 10
    rows = {bytes(img.numpy().tobytes()) for img in held.train.images}
    assert not any(bytes(img.numpy().tobytes()) in rows for img in held.val.images)


def test_cifar10_corrupt_batch_fails_naming_the_root(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"corrupt")
    with pytest.raises(FileNotFoundError, match="cifar10.*" + str(tmp_path)):
        splits_of("dataset=cifar10", f"dataset.root={tmp_path}")


# ------------------------------------------------------------------ CIFAR-100 (python pickle batches)
def write_cifar100(root: Path, monkeypatch, train_labels: list[int], test_labels: list[int]):
    from torchvision.datasets import CIFAR100

    folder = root / CIFAR100.base_folder
    folder.mkdir(parents=True)
    images = {"train": rng_images(len(train_labels), 3072, seed=1), "test": rng_images(len(test_labels), 3072, seed=2)}
    for name, labels in (("train", train_labels), ("test", test_labels)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images[name], "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    # torchvision checks the md5 of each file: point its table at the files written here
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(folder / "meta")})
    return images


def test_cifar100_reads_pickle_batches(tmp_path, monkeypatch):
    train_labels = [i % 100 for i in range(300)]
    images = write_cifar100(tmp_path, monkeypatch, train_labels, [7, 3, 99])
    splits = splits_of("dataset=cifar100", f"dataset.root={tmp_path}", "dataset.source.val_size=0")
    expected = torch.from_numpy(images["train"].reshape(-1, 3, 32, 32))  # CIFAR rows are R, G, B planes
    assert torch.equal(splits.train.images, expected)
    assert splits.train.labels.tolist() == train_labels
    assert torch.equal(splits.test.images, torch.from_numpy(images["test"].reshape(-1, 3, 32, 32)))
    assert splits.test.labels.tolist() == [7, 3, 99]
    assert splits.classes[:2] == ["c0", "c1"] and len(splits.classes) == 100


def test_cifar_md5_check_stays_on(tmp_path, monkeypatch):
    write_cifar100(tmp_path, monkeypatch, [i % 100 for i in range(200)], [1])
    with open(tmp_path / "cifar-100-python" / "train", "ab") as f:
        f.write(b"corrupt")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        splits_of("dataset=cifar100", f"dataset.root={tmp_path}", "dataset.source.val_size=0")


# ------------------------------------------------------------------ STL-10 (binaries)
def write_stl10(root: Path, monkeypatch, n_train=20, n_test=10, n_unlabeled=6):
    from torchvision.datasets import STL10

    folder = root / STL10.base_folder
    folder.mkdir(parents=True)
    data = {"train": rng_images(n_train, 3, 96, 96, seed=3), "test": rng_images(n_test, 3, 96, 96, seed=4),
            "unlabeled": rng_images(n_unlabeled, 3, 96, 96, seed=5)}
    labels = {"train": np.arange(n_train) % 10, "test": (np.arange(n_test) * 3) % 10}
    for name, images in data.items():  # stored column-major per image: (N, C, W, H)
        (folder / f"{name}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
    for name, y in labels.items():  # 1-based on disk
        (folder / f"{name}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    monkeypatch.setattr(STL10, "train_list", [[f, md5(folder / f)] for f in ("train_X.bin", "train_y.bin", "unlabeled_X.bin")])
    monkeypatch.setattr(STL10, "test_list", [[f, md5(folder / f)] for f in ("test_X.bin", "test_y.bin")])
    return data, labels


def test_stl10_reads_binaries_with_unlabeled_pool(tmp_path, monkeypatch):
    data, labels = write_stl10(tmp_path, monkeypatch)
    args = ("dataset=stl10", f"dataset.root={tmp_path}", "dataset.source.val_size=0")
    splits = splits_of(*args)
    assert torch.equal(splits.train.images, torch.from_numpy(data["train"]))
    assert splits.train.labels.tolist() == labels["train"].tolist()
    assert torch.equal(splits.test.images, torch.from_numpy(data["test"]))
    assert torch.equal(splits.unlabeled.images, torch.from_numpy(data["unlabeled"]))
    assert splits.classes[0] == "k0"
    # pretraining sees train + unlabeled (labels -1); a probe sees the labelled train split only
    pool = build_splits(context(*args), labelled=False)
    assert len(pool.train) == 20 + 6 and (pool.train.labels == -1).sum() == 6
    assert torch.equal(pool.train.images[20:], torch.from_numpy(data["unlabeled"]))
    probe = build_splits(context(*args), labelled=True)
    assert len(probe.train) == 20 and (probe.train.labels >= 0).all()


def test_stl10_missing_file_is_named(tmp_path, monkeypatch):
    write_stl10(tmp_path, monkeypatch)
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").unlink()
    with pytest.raises(FileNotFoundError) as err:
        splits_of("dataset=stl10", f"dataset.root={tmp_path}")
    assert str(tmp_path) in str(err.value) and "stl10_binary/unlabeled_X.bin" in str(err.value)
    assert "download=true" in str(err.value)


# ------------------------------------------------------------------ MNIST / Fashion-MNIST (idx files)
def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 + array.ndim  # 0x08: unsigned byte, then the number of dimensions
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("variant,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_reads_idx_files(tmp_path, variant, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    train, test = rng_images(30, 28, 28, seed=6), rng_images(5, 28, 28, seed=7)
    train_y, test_y = np.arange(30) % 10, np.array([9, 8, 7, 6, 5])
    for prefix, x, y in (("train", train, train_y), ("t10k", test, test_y)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    splits = splits_of(f"dataset={variant}", f"dataset.root={tmp_path}", "dataset.source.val_size=0")
    assert torch.equal(splits.train.images, torch.from_numpy(train)[:, None])
    assert splits.train.labels.tolist() == train_y.tolist()
    assert torch.equal(splits.test.images, torch.from_numpy(test)[:, None])
    assert splits.test.labels.tolist() == test_y.tolist()


def test_mnist_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        splits_of("dataset=mnist", f"dataset.root={tmp_path}")
    msg = str(err.value)  # root, each place looked in, and the four file names
    assert str(tmp_path) in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert all(f"{p}-{kind}-ubyte" in msg for p in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))


# ------------------------------------------------------------------ image folders (PNG)
def write_folder(folder: Path, per_class: dict[str, int], size=(8, 8), seed=0) -> dict[str, list[np.ndarray]]:
    out = {}
    for c, n in per_class.items():
        (folder / c).mkdir(parents=True)
        out[c] = [rng_images(1, size[1], size[0], 3, seed=seed + 10 * i + len(c))[0] for i in range(n)]
        for i, pixels in enumerate(out[c]):
            Image.fromarray(pixels).save(folder / c / f"{i:03d}.png")
    return out


def test_imagefolder_reads_train_and_test_folders(tmp_path):
    train = write_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    test = write_folder(tmp_path / "test", {"cat": 1, "dog": 1}, seed=50)
    splits = splits_of("dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.num_classes=2",
                       "dataset.image_size=8", "dataset.source.val_ratio=0", "dataset.eval_crop_ratio=1.0",
                       "dataset.loader=memory")
    assert splits.classes == ["cat", "dog"]
    assert splits.train.labels.tolist() == [0, 0, 0, 1, 1] and splits.val is None
    assert torch.equal(splits.train.images[3], torch.from_numpy(train["dog"][0]).permute(2, 0, 1))
    assert torch.equal(splits.test.images[1], torch.from_numpy(test["dog"][0]).permute(2, 0, 1))


def test_imagefolder_resizes_and_holds_out_by_ratio(tmp_path):
    write_folder(tmp_path, {"a": 10, "b": 10, "c": 10}, size=(20, 12))
    splits = splits_of("dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.num_classes=3",
                       "dataset.image_size=8", "dataset.channels=1", "dataset.norm.mean=[0.5]", "dataset.norm.std=[0.5]",
                       "dataset.source.val_ratio=0.2", "dataset.source.test_ratio=0.3")  # torchvision's layout, found
    assert splits.train.images.shape[1:] == (1, 8, 8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 6, 9)
    assert sorted(Counter(splits.test.labels.tolist()).values()) == [3, 3, 3]  # stratified


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*no class folders.*<class>/<image>"):
        splits_of("dataset=imagefolder", f"dataset.root={tmp_path}")
    with pytest.raises(FileNotFoundError, match=f"dataset.root='{tmp_path}/nope' is not a folder"):
        splits_of("dataset=imagefolder", f"dataset.root={tmp_path}/nope")
    write_folder(tmp_path / "train", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="2 class folders.*but dataset.num_classes=10.*num_classes=2"):
        splits_of("dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.num_classes=10")


# ------------------------------------------------------------------ npy splits
def write_npy(root: Path, split: str, n: int, seed: int, images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    images = rng_images(n, 32, 32, 3, seed=seed) if images is None else images
    labels = (np.arange(len(images)) % 10).astype(np.int64)
    np.save(root / f"{split}_images.npy", images)
    np.save(root / f"{split}_labels.npy", labels)
    return images, labels


def test_npy_reads_splits_and_pools_probe_with_train(tmp_path):
    train, train_y = write_npy(tmp_path, "train", 30, seed=8)
    test, test_y = write_npy(tmp_path, "test", 10, seed=9)
    val, _ = write_npy(tmp_path, "val", 10, seed=10)
    args = ("dataset=npy", f"dataset.root={tmp_path}")
    splits = splits_of(*args)
    assert torch.equal(splits.train.images, torch.from_numpy(train).permute(0, 3, 1, 2))
    assert splits.train.labels.tolist() == train_y.tolist()
    assert torch.equal(splits.val.images, torch.from_numpy(val).permute(0, 3, 1, 2))
    assert splits.test.labels.tolist() == test_y.tolist() and splits.unlabeled is None
    # a probe split that overlaps train: probes train on it, pretraining sees each image once
    probe, _ = write_npy(tmp_path, "probe", 10, seed=0, images=train[:10])
    splits = splits_of(*args)
    assert torch.equal(splits.train.images, torch.from_numpy(probe).permute(0, 3, 1, 2))
    assert len(splits.unlabeled) == 20 and (splits.unlabeled.labels == -1).all()
    assert len(build_splits(context(*args), labelled=False).train) == 30


def test_npy_missing_files_are_named(tmp_path):
    write_npy(tmp_path, "train", 10, seed=1)
    with pytest.raises(FileNotFoundError) as err:
        splits_of("dataset=npy", f"dataset.root={tmp_path}")
    assert str(tmp_path) in str(err.value) and "test_images.npy" in str(err.value) and "train_" not in str(err.value)


# ------------------------------------------------------------------ Oxford-IIIT Pet (images + trimaps)
def write_pets(root: Path) -> dict[str, tuple[int, np.ndarray]]:
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations" / "trimaps").mkdir(parents=True)
    written = {}
    lines = {"trainval": [], "test": []}
    for i, (breed, label, species) in enumerate([("Abyssinian", 1, 1), ("beagle", 2, 2)] * 4):
        image_id = f"{breed}_{i}"
        colour = np.array([30 * i, 200 - 20 * i, 90], dtype=np.uint8)  # flat: JPEG keeps it within a level or two
        Image.fromarray(np.broadcast_to(colour, (16, 16, 3)).copy()).save(base / "images" / f"{image_id}.jpg", quality=100)
        trimap = np.full((16, 16), 2, np.uint8)  # background
        trimap[4:12, 4:12] = 3                     # border band
        trimap[6:10, 6:10] = 1                     # the pet
        Image.fromarray(trimap).save(base / "annotations" / "trimaps" / f"{image_id}.png")
        lines["trainval" if i < 6 else "test"].append(f"{image_id} {label} {species} {i}")
        written[image_id] = (label - 1, colour)
    for split, rows in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return written


def test_pets_reads_images_labels_and_masks(tmp_path):
    written = write_pets(tmp_path)
    splits = splits_of("dataset=pets", f"dataset.root={tmp_path}", "dataset.image_size=16", "dataset.source.val_size=0")
    assert len(splits.train) == 6 and len(splits.test) == 2
    assert splits.train.labels.tolist() == [0, 1] * 3 and splits.classes == ["Abyssinian", "Beagle"]
    for k, (label, colour) in enumerate(list(written.values())[:6]):
        mean = splits.train.images[k].float().mean((1, 2))
        assert torch.allclose(mean, torch.tensor(colour, dtype=torch.float), atol=3), (k, mean, colour)
    mask = splits.train.masks[0]
    assert mask.dtype == torch.uint8 and mask.shape == (16, 16)
    assert mask[4:12, 4:12].all() and mask.sum() == 64  # pet + border (border: 1)
    splits = splits_of("dataset=pets", f"dataset.root={tmp_path}", "dataset.image_size=16",
                       "dataset.source.val_size=0", "dataset.source.border=0")
    assert splits.test.masks[0].sum() == 16 and splits.test.masks[0][6:10, 6:10].all()


def test_pets_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        splits_of("dataset=pets", f"dataset.root={tmp_path}")
    assert str(tmp_path) in str(err.value) and "oxford-iiit-pet/annotations/trimaps" in str(err.value)
    write_pets(tmp_path)
    (tmp_path / "oxford-iiit-pet" / "images" / "beagle_1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="beagle_1.jpg"):
        splits_of("dataset=pets", f"dataset.root={tmp_path}")


# ------------------------------------------------------------------ label fraction and data ratio
def test_fraction_keeps_a_tenth_of_each_class():
    full = build_splits(context(), labelled=True).train
    tenth = build_splits(context("dataset.fraction=0.1"), labelled=True).train
    before, after = Counter(full.labels.tolist()), Counter(tenth.labels.tolist())
    assert sorted(after) == list(range(10))
    for c in range(10):
        assert after[c] == round(0.1 * before[c]), (c, before[c], after[c])


def test_data_ratio_shrinks_training_data_for_every_stage():
    full = build_splits(context(), labelled=False)
    half = build_splits(context("dataset.data_ratio=0.5"), labelled=False)
    assert len(half.train) == pytest.approx(len(full.train) / 2, abs=5)
    assert len(half.test) == len(full.test)  # the test split is never cut
    # a probe on top of the ratio: data_ratio first, then the label fraction of what is left
    probe = build_splits(context("dataset.data_ratio=0.5", "dataset.fraction=0.2"), labelled=True)
    assert len(probe.train) == pytest.approx(0.1 * len(full.train), abs=10)
    # the same seed picks the same images in every stage of a pipeline
    again = build_splits(context("dataset.data_ratio=0.5"), labelled=False)
    assert torch.equal(half.train.images, again.train.images)


def test_data_ratio_cuts_the_unlabeled_pool_too():
    from sslpipe.data.split import Split, data_ratio_subset

    pool = Split(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.full((100,), -1))
    assert len(data_ratio_subset(pool, 0.25, seed=0)) == 25


def test_resize_in_chunks_equals_one_pass():
    from sslpipe.data.split import resize_uint8

    x = torch.from_numpy(rng_images(10, 3, 20, 20))
    one = torch.nn.functional.interpolate(x.float(), size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(resize_uint8(x, 8, chunk=3), one.round().clamp(0, 255).to(torch.uint8))
