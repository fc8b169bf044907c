"""WebDataset shards (issue 11): `python -m sslpipe.data.shard` on real PNG / JPEG files, the
index it writes, and the shard loader's guarantees: every sample once per epoch across ranks
and workers, equal steps per rank, exact resume, eval in order; `dataset=shards` end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslpipe.data.shard import main
from sslpipe.data.shards import ShardLoader, load_shards, shard_split
from sslpipe.data.stream import CropSpec, EvalCrop, open_image

CLASSES = ["ant", "bee", "cow"]
PER_CLASS = 13  # 39 images: with 2 ranks x batch 4 the epoch has a remainder of 7
CROPS = [CropSpec(2, 8, (0.3, 1.0)), CropSpec(1, 6, (0.1, 0.5))]


def write_images(folder: Path, classes=CLASSES, per_class=PER_CLASS, seed=0) -> None:
    """PNG and JPEG files of varied sizes and content, `per_class` in each class folder."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (18 + i, 24 + 2 * c, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if i % 3 == 0:
                image.save(folder / name / f"{i:02d}.jpg", quality=90)
            elif i % 3 == 1:
                image.save(folder / name / f"{i:02d}.png")
            else:
                image.convert("L").save(folder / name / f"img.{i:02d}.JPEG")  # a dot in the stem, upper-case suffix


def shard_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslpipe.data.shard", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(image folder, shard folder) written through the CLI."""
    base = tmp_path_factory.mktemp("shards")
    write_images(base / "images")
    result = shard_cli(str(base / "images"), str(base / "out"), "--shard-size", "10")
    assert result.returncode == 0, result.stderr
    assert "39 images into 4 shards" in result.stdout and " s -> " in result.stdout
    return base / "images", base / "out"


def loader(split, rank=0, world_size=1, batch_size=4, workers=2, **kw) -> ShardLoader:
    return ShardLoader(split, split.settings or load_settings(), batch_size, crops=kw.pop("crops", CROPS), seed=3,
                       rank=rank, world_size=world_size, workers=workers, **kw)


def load_settings():
    from sslpipe.data.shards import ShardReadSettings

    return ShardReadSettings(8, 3, shuffle_buffer=6)


# ------------------------------------------------------------------ writing
def test_shards_round_trip_every_image_and_label(sharded):
    images, out = sharded
    index = json.loads((out / "train" / "index.json").read_text())
    assert index["classes"] == CLASSES and index["total"]["images"] == 39 and index["total"]["shards"] == 4
    assert [s["count"] for s in index["shards"]] == [10, 10, 10, 9]
    seen = set()
    for shard in index["shards"]:
        path = out / "train" / shard["name"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        with tarfile.open(path) as tar:  # read as a plain tar, independently of the index
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert len(members) == 2 * shard["count"]
        for key, ext, rel, label, offset, size in zip(shard["keys"], shard["exts"], shard["paths"], shard["labels"],
                                                      shard["offsets"], shard["sizes"]):
            original = (images / rel).read_bytes()
            assert members[f"{key}.{ext}"] == original                      # the bytes exactly as on disk
            assert ext == Path(rel).suffix[1:].lower()                      # under their own extension
            assert data[offset:offset + size] == original                   # the recorded offset and size
            assert members[f"{key}.cls"] == str(label).encode()             # the label as text
            assert CLASSES[label] == Path(rel).parts[0]
            seen.add(rel)
        if shard["count"] == 10:
            assert len(set(shard["labels"])) == 3  # class-interleaved: every full shard mixes the classes
    assert seen == {str(p.relative_to(images)) for p in images.rglob("*") if p.parent.name in CLASSES}

    import webdataset as wds  # and WebDataset itself reads them
    samples = list(wds.WebDataset(str(out / "train" / "shard-{000000..000003}.tar"), shardshuffle=False))
    assert len(samples) == 39 and all(int(s["cls"]) in (0, 1, 2) for s in samples)


def test_imagenet_layout_writes_one_set_per_split_and_reads_val_as_test(tmp_path):
    write_images(tmp_path / "img" / "train", per_class=6)
    write_images(tmp_path / "img" / "val", per_class=2, seed=1)
    assert main([str(tmp_path / "img"), str(tmp_path / "out"), "--shard-size", "5"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train", "val"]  # no temporary folder left
    first = (tmp_path / "out" / "train" / "shard-000000.tar").read_bytes()
    assert main([str(tmp_path / "img"), str(tmp_path / "out"), "--shard-size", "5", "--overwrite"]) == 0
    assert (tmp_path / "out" / "train" / "shard-000000.tar").read_bytes() == first  # deterministic, byte for byte
    splits = load_shards(str(tmp_path / "out"), 8, num_classes=3, val_ratio=0.2)
    assert len(splits.test) == 6 and splits.test.labels.tolist().count(0) == 2  # ImageNet: val/ is the test split
    assert len(splits.train) + len(splits.val) == 18 and len(splits.val) == 4  # val held out from train
    assert not set(splits.train.paths.relative(i) for i in range(len(splits.train))) & set(
        splits.val.paths.relative(i) for i in range(len(splits.val)))


# ------------------------------------------------------------------ reading
def test_ranks_and_workers_read_every_sample_once_in_equal_steps(sharded):
    _, out = sharded
    split = shard_split(out / "train").with_settings(load_settings())
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            ld = loader(split, rank=rank, world_size=2, index_labels=True)
            ld.set_epoch(epoch)
            batches = list(ld)
            assert len(batches) == len(ld) == 4  # (39 // (2 * 4)) * 4 = 16 samples per rank
            for views, index in batches:
                assert [tuple(v.shape) for v in views] == [(4, 3, 8, 8), (4, 3, 8, 8), (4, 3, 6, 6)]
                assert all(v.dtype == torch.uint8 for v in views)
            per_rank.append(torch.cat([index for _, index in batches]).tolist())
        everything = per_rank[0] + per_rank[1]
        assert len(set(everything)) == len(everything) == 32  # disjoint, each once
        # the 7 not read are the tail of the epoch's sequence (whole shards permuted by (seed, epoch))
        sequence = ld.sequence(epoch)
        assert set(range(39)) - set(everything) == set(sequence[32:].tolist())
        # ranks and workers take contiguous ranges of the sequence, in order
        ranges = [set(loader(split, rank=r, world_size=2).role_items(epoch, w, 2).tolist()) for r in (0, 1)
                  for w in (0, 1)]
        assert [len(r) for r in ranges] == [8, 8, 8, 8]
        assert set().union(*ranges[:2]) == set(sequence[:16].tolist()) == set(per_rank[0])
        # each worker reads at most 2 shards (10-sample shards, 8-sample ranges)
        assert all(len({int(split.shard[i]) for i in r}) <= 2 for r in ranges)
    assert len({tuple(ld.sequence(e).tolist()) for e in range(6)}) > 1  # the shard order changes with the epoch


def test_labels_are_the_splits_labels(sharded):
    _, out = sharded
    split = shard_split(out / "train").with_settings(load_settings())
    ld = loader(split, workers=0)
    for (_, labels), (_, index) in zip(ld, loader(split, workers=0, index_labels=True)):
        assert torch.equal(labels, split.labels[index])


@pytest.mark.parametrize("start", [3, 4])
def test_resume_yields_exactly_the_rest_of_the_epoch(sharded, start):
    _, out = sharded
    split = shard_split(out / "train").with_settings(load_settings())
    full = loader(split, index_labels=True)
    full.set_epoch(2)
    whole = list(full)
    assert len(whole) == 9
    resumed = loader(split, index_labels=True)  # a fresh process' loader
    resumed.set_epoch(2, start=start)
    rest = list(resumed)
    assert len(rest) == 9 - start
    for (views_a, labels_a), (views_b, labels_b) in zip(whole[start:], rest):
        assert torch.equal(labels_a, labels_b)
        assert all(torch.equal(a, b) for a, b in zip(views_a, views_b))
    full.set_epoch(2, start=start)  # the same loader (persistent workers) gets the new start too
    again = list(full)
    assert [lab.tolist() for _, lab in again] == [lab.tolist() for _, lab in rest]


def test_eval_loader_reads_in_order_the_eval_view(sharded):
    from sslpipe.data.loaders import eval_loader

    images, out = sharded
    splits = load_shards(str(out), 12, workers=2)
    test = splits.test
    assert len(test) == 8 and len(splits.val) == 4 and len(splits.train) == 27
    got = list(eval_loader(test, 3))
    assert [len(lab) for _, lab in got] == [3, 3, 2]
    assert torch.equal(torch.cat([lab for _, lab in got]), test.labels)
    crop = EvalCrop(12, 0.875, "RGB")
    index = json.loads((out / "train" / "index.json").read_text())
    source = {f"{s['name']}/{k}.{e}": p for s in index["shards"] for k, e, p in zip(s["keys"], s["exts"], s["paths"])}
    expected = []
    for i in range(len(test)):
        path = str(images / source[test.paths.relative(i)])
        with open_image(path) as image:
            expected.append(crop(image, path))
    assert torch.equal(torch.cat([x for x, _ in got]), torch.stack(expected))  # the folder path's eval view


# ------------------------------------------------------------------ end to end
def test_pretrain_on_shards_end_to_end(sharded, cli):
    _, out = sharded
    result = cli("stage=pretrain", "dataset=shards", f"dataset.root={out}", "dataset.image_size=32",
                 "stage.pretrain.loop.max_steps=3", "stage.pretrain.batch_size=8", "dataset.workers=1")
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------ bad input
def test_missing_folder_fails_naming_it_and_writes_nothing(tmp_path):
    result = shard_cli(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode != 0 and f"'{tmp_path / 'nope'}'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_input_names_the_value(tmp_path, capsys):
    (tmp_path / "empty" / "ant").mkdir(parents=True)
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no images" in capsys.readouterr().err and not (tmp_path / "out").exists()
    write_images(tmp_path / "img", per_class=2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main([str(tmp_path / "img"), str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'busy'}' is not empty" in err and "--overwrite" in err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]  # nothing half-written
    assert main([str(tmp_path / "img"), str(tmp_path / "out"), "--split", "val"]) == 2
    assert "--split val" in capsys.readouterr().err


def test_shards_root_without_index_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/index\.json"):
        load_shards(str(tmp_path), 8)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_shards(str(tmp_path / "nope"), 8)


def test_a_truncated_shard_is_named(sharded, tmp_path):
    import shutil

    _, out = sharded
    shutil.copytree(out, tmp_path / "out")
    shard = tmp_path / "out" / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ValueError, match="shard-000001.tar has 5000 bytes"):
        load_shards(str(tmp_path / "out"), 8)


def test_an_undecodable_image_is_named_or_skipped(tmp_path):
    from sslpipe.data.shards import ShardReadSettings
    from sslpipe.data.stream import BadImageError

    write_images(tmp_path / "img", per_class=3)
    (tmp_path / "img" / "bee" / "broken.png").write_bytes(b"not a png at all")
    assert main([str(tmp_path / "img"), str(tmp_path / "out")]) == 0
    split = shard_split(tmp_path / "out" / "train")
    with pytest.raises(BadImageError, match=r"shard-000000\.tar/\d{9}\.png.*skip_bad_images"):
        list(loader(split.with_settings(ShardReadSettings(8, 3)), batch_size=10, workers=0))
    batches = list(loader(split.with_settings(ShardReadSettings(8, 3, skip_bad=True)), batch_size=10, workers=0))
    assert [len(labels) for _, labels in batches] == [10]
