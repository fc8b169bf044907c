"""The streaming data path on real JPEG/PNG files: views cut from the full-resolution image,
exact order and resume, the file index, layouts, bad images named by path, and a streamed
pretrain killed mid-epoch that resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslpipe.data import files
from sslpipe.data.imagefolder import load_imagefolder
from sslpipe.data.stream import BadImageError, CropSpec, OrderSampler, StreamLoader

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)


def write_jpegs(folder: Path, classes: dict[str, int], seed: int = 0, size=(40, 56)) -> None:
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = int(rng.integers(*size)), int(rng.integers(*size))
            pixels = (rng.random((h, w, 3)) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:04d}.jpg", quality=90)


def load(root: Path, **kw):
    kw = {"image_size": 16, "loader": "stream", "workers": 0, **kw}
    return load_imagefolder(str(root), **kw)


# ------------------------------------------------------------------ views from the original image
def test_training_views_come_from_the_full_image_not_its_centre_square(tmp_path):
    """A 240x80 image whose central 80x80 square is black and whose sides are white: the memory
    path (centre square) never shows white; streamed global and local crops do."""
    pixels = np.full((80, 240, 3), 255, np.uint8)
    pixels[:, 80:160] = 0
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(8):
            Image.fromarray(pixels).save(tmp_path / c / f"{i}.png")
    memory = load(tmp_path, loader="memory", eval_crop_ratio=1.0, test_ratio=0.25, val_ratio=0)
    # the centre square is all the memory path has (the resize filter's edge blends in a little white)
    assert int(memory.train.images.max()) < 64

    splits = load(tmp_path, test_ratio=0.25, val_ratio=0)
    crops = [CropSpec(2, 32, (0.2, 1.0)), CropSpec(4, 16, (0.05, 0.4))]
    loader = StreamLoader(splits.train, splits.train.settings, batch_size=4, crops=crops, seed=0)
    globals_, locals_ = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for views, _ in loader:
            assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 4
            globals_ += [v for v in views[:2]]
            locals_ += [v for v in views[2:]]
    white = lambda vs: sum(int((v > 200).any(dim=(1, 2, 3)).sum()) for v in vs)  # noqa: E731
    assert white(globals_) > 0 and white(locals_) > 0


# ------------------------------------------------------------------ order, ranks, resume
def test_ranks_read_disjoint_shares_and_cover_the_epoch():
    keys = []
    for rank in range(2):
        sampler = OrderSampler(103, 10, shuffle=True, drop_last=True, seed=3, rank=rank, world_size=2)
        sampler.epoch = 1
        batches = list(sampler)
        assert len(batches) == 5
        keys.append({i for b in batches for i, e in b if e == 1})
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 100  # 103 // 2 // 10 batches of 10 per rank


def test_resumed_epoch_yields_exactly_the_remaining_batches(tmp_path):
    write_jpegs(tmp_path, {"a": 12, "b": 12})
    splits = load(tmp_path, workers=2, test_ratio=0.25, val_ratio=0)
    crops = [CropSpec(2, 16, (0.2, 1.0))]

    def epoch(start: int) -> list:
        loader = StreamLoader(splits.train, splits.train.settings, batch_size=4, crops=crops, seed=7)
        loader.set_epoch(2, start=start)
        return list(loader)

    full, resumed = epoch(0), epoch(2)
    assert len(full) == 18 // 4 and len(resumed) == len(full) - 2
    for (va, la), (vb, lb) in zip(full[2:], resumed):
        assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb))
    other = StreamLoader(splits.train, splits.train.settings, batch_size=4, crops=crops, seed=7)
    other.set_epoch(3)
    assert not torch.equal(next(iter(other))[0][0], full[0][0][0])  # a new epoch draws new crops


def test_training_reads_on_across_the_epoch_boundary_with_the_same_batches(tmp_path):
    """One DataLoader iterator serves consecutive epochs (the workers prepare the next epoch's
    first batches while this one's last steps train), and yields what a fresh loader per epoch
    yields; a set_epoch anywhere else (resume, rewind, an early stop) starts again there."""
    write_jpegs(tmp_path, {"a": 10, "b": 10})
    splits = load(tmp_path, workers=2, test_ratio=0.2, val_ratio=0)
    crops = [CropSpec(2, 16, (0.2, 1.0))]

    def make(across: bool) -> StreamLoader:
        return StreamLoader(splits.train, splits.train.settings, batch_size=3, crops=crops, seed=5, across_epochs=across)

    def read(loader, epoch: int, start: int = 0, stop: int | None = None) -> list:
        loader.set_epoch(epoch, start)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == stop:
                break
        return out

    fresh = [read(make(False), e) for e in range(3)]
    loader = make(True)
    assert len(fresh[0]) == 16 // 3
    live = []
    for e in range(3):
        got = read(loader, e)
        assert len(got) == len(fresh[e])
        for (va, la), (vb, lb) in zip(got, fresh[e]):
            assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb))
        live.append(loader._live)
    assert live[0] is live[1] is live[2]  # one iterator across the three epochs
    assert len(read(loader, 3, stop=2)) == 2  # stopped early, then resumed elsewhere
    resumed = read(loader, 1, start=2)
    assert loader._live is not live[0]
    for (va, la), (vb, lb) in zip(resumed, fresh[1][2:]):
        assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(va, vb))
    for (va, _), (vb, _) in zip(read(loader, 2), fresh[2]):  # continues from the resumed position
        assert all(torch.equal(a, b) for a, b in zip(va, vb))
    loader.close()


# ------------------------------------------------------------------ file index
def test_file_index_is_written_once_and_reused_until_the_tree_changes(tmp_path, monkeypatch):
    write_jpegs(tmp_path / "train", {"a": 3, "b": 2})
    first = load(tmp_path, test_ratio=0.4, val_ratio=0)
    assert (tmp_path / "train" / ".sslpipe-index.npz").exists()

    def no_scan(*a, **kw):
        raise AssertionError("listed the tree again although it did not change")

    monkeypatch.setattr(files, "list_class_folders", no_scan)
    again = load(tmp_path, test_ratio=0.4, val_ratio=0)
    assert [again.train.paths[i] for i in range(len(again.train))] == [first.train.paths[i] for i in range(len(first.train))]
    monkeypatch.undo()
    write_jpegs(tmp_path / "train", {"c": 2}, seed=5)  # a new class folder: the fingerprint changes
    grown = load(tmp_path, test_ratio=0.4, val_ratio=0)
    assert len(grown.classes) == 3 and len(grown.train) + len(grown.test) == 7


def test_index_falls_back_to_index_dir_when_the_data_folder_rejects_writes(tmp_path, monkeypatch):
    """Root ignores permission bits, so make the write beside the data fail another way."""
    data, index_dir = tmp_path / "data", tmp_path / "outputs" / "index"
    write_jpegs(data, {"a": 3, "b": 3})
    (data / ".sslpipe-index.npz").mkdir()  # a folder where the index file would go: np.savez/os.replace fail
    splits = load(data, index_dir=str(index_dir), test_ratio=0.4, val_ratio=0)
    assert len(splits.train) + len(splits.test) == 6 and len(list(index_dir.glob("*.npz"))) == 1


# ------------------------------------------------------------------ layouts and loader choice
def test_imagenet_layout_val_folder_is_the_test_split_and_classes_are_inferred(tmp_path):
    write_jpegs(tmp_path / "train", {"n01": 10, "n02": 10, "n03": 10})
    write_jpegs(tmp_path / "val", {"n01": 2, "n02": 2, "n03": 2}, seed=9)
    splits = load(tmp_path, val_ratio=0.2)
    assert splits.classes == ["n01", "n02", "n03"] and splits.loader == "stream"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 6)
    assert all("/val/" in splits.test.paths[i] for i in range(6))
    with pytest.raises(ValueError, match="3 class folders.*dataset.num_classes=5"):
        load(tmp_path, num_classes=5)


def test_auto_loader_takes_memory_within_the_budget_and_streams_beyond_it(tmp_path):
    write_jpegs(tmp_path, {"a": 5, "b": 5})
    small = load(tmp_path, loader="auto", memory_budget_gb=1.0, test_ratio=0.2, val_ratio=0)
    assert small.loader == "memory" and small.train.images.shape[1:] == (3, 16, 16)
    big = load(tmp_path, loader="auto", memory_budget_gb=1e-6, test_ratio=0.2, val_ratio=0)
    assert big.loader == "stream" and not hasattr(big.train, "images")
    with pytest.raises(ValueError, match="dataset.loader='fast' is not one of: auto, memory, stream"):
        load(tmp_path, loader="fast")


# ------------------------------------------------------------------ bad images
def test_truncated_image_is_named_by_path_or_skipped_on_request(tmp_path):
    write_jpegs(tmp_path, {"a": 6, "b": 6})
    bad = tmp_path / "b" / "0003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # cut off mid-scan, as a failed download leaves it
    with pytest.raises(BadImageError, match=f"{bad}.*skip_bad_images"):
        load(tmp_path, loader="memory", test_ratio=0.25, val_ratio=0)
    kept = load(tmp_path, loader="memory", skip_bad_images=True, test_ratio=0.25, val_ratio=0)
    assert len(kept.train) + len(kept.test) == 11

    streamed = load(tmp_path, test_ratio=0.25, val_ratio=0)
    everything = streamed.train.subset(np.arange(len(streamed.train)))
    with pytest.raises(BadImageError, match=str(bad)):
        for split in (streamed.train, streamed.test):
            list(StreamLoader(split, split.settings, batch_size=3, crops=None, shuffle=False, drop_last=False))
    assert len(everything) == len(streamed.train)


def test_a_dropped_stream_loader_stops_its_workers_without_the_garbage_collector(tmp_path):
    """An eval pass and a training loader (endless: left mid-stream, as at the end of a run)
    free their DataLoader, and so join their workers, as soon as the last reference goes. A
    reference cycle would leave them to the garbage collector, whose order makes each worker's
    join wait out its 5 s timeout (5.2 s after every eval pass with 2 workers, measured)."""
    import gc
    import multiprocessing

    write_jpegs(tmp_path, {"a": 6, "b": 6}, size=(40, 50))
    splits = load(tmp_path, test_ratio=0.25, val_ratio=0, workers=2)
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        for crops in (None, [CropSpec(2, 16, (0.3, 1.0))]):
            loader = StreamLoader(splits.train, splits.train.settings, 3, crops=crops)
            assert sum(len(labels) for _, labels in loader) == 9
            assert len(set(multiprocessing.active_children()) - before) == 2, crops
            del loader
            assert set(multiprocessing.active_children()) - before == set(), f"workers outlived the loader ({crops})"
    finally:
        gc.enable()


# ------------------------------------------------------------------ a streamed run killed mid-epoch
RUN = ["stage=pretrain", "dataset=imagefolder", "dataset.image_size=16", "dataset.loader=stream", "dataset.workers=2",
       "stage.pretrain.loop.epochs=20", "stage.pretrain.loop.max_steps=40", "stage.pretrain.batch_size=4", "stage.pretrain.loop.checkpoint_every=7", "stage.pretrain.loop.log_every=1",
       "backbone.width=8", "backbone.num_features=32"]


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "sslpipe", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def streamed_reference(tmp_path_factory):
    """A JPEG folder and an uninterrupted streamed run of RUN on it: (folder, run folder)."""
    root = tmp_path_factory.mktemp("streamed")
    write_jpegs(root / "data", {"a": 60, "b": 60, "c": 60})
    reference = root / "outputs" / "reference"
    done = _cli([*RUN, f"dataset.root={root / 'data'}", f"hydra.run.dir={reference}"], root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "data", reference


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGUSR2, signal.SIGKILL], ids=["sigusr2", "sigkill"])
def test_streamed_pretrain_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, stop, streamed_reference):
    """SIGUSR2 (SLURM's warning): checkpoint at the next step and exit. SIGKILL: lose the steps
    since the last periodic checkpoint (every 7 steps: always mid-epoch, 31 batches an epoch).
    The signal goes out once the step-7 checkpoint is on disk; with 10 batches an epoch a busy
    machine let the run reach the boundary at step 10 before it landed (CI, 2026-12-07), so
    the epoch is long enough that only a 24-step delay would reach it."""
    from test_resume import assert_same_weights

    from sslpipe import checkpoint as ckpt

    data, reference = streamed_reference
    run = [*RUN, f"dataset.root={data}"]

    job = tmp_path / "outputs" / "job"
    proc = subprocess.Popen([sys.executable, "-m", "sslpipe", *run, f"hydra.run.dir={job}"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time

    deadline = time.time() + 120
    while not (job / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(stop)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == (128 + stop if stop == signal.SIGUSR2 else -stop), out[-3000:]
    loop = ckpt.load(job / "checkpoints" / "last.pt")["loop"]
    batches_per_epoch = 126 // 4  # 180 images, 30 % held out
    assert loop["step"] < 40 and loop["batch"] % batches_per_epoch, f"stopped at an epoch boundary: {loop}"

    done = _cli([*run, f"hydra.run.dir={job}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(reference, job)  # same samples, same crops, same order: bitwise on CPU


# ------------------------------------------------------------------ the GPU-decode path, run on the CPU
def test_device_decode_path_cuts_the_same_views_as_the_worker_path(tmp_path):
    """dataset.loader=gpu decodes whole batches with torchvision's decode_jpeg on the training
    device and cuts the views there; with device cpu the same code runs here. Same boxes as the
    worker path, so the views agree up to the resampling filter (roi_align vs PIL bilinear)."""
    import dataclasses

    write_jpegs(tmp_path, {"a": 6, "b": 6}, size=(60, 90))
    Image.fromarray(np.full((50, 70, 3), 128, np.uint8)).save(tmp_path / "a" / "grey.png")  # not a JPEG
    splits = load(tmp_path, test_ratio=0.25, val_ratio=0, eval_crop_ratio=0.875)
    on_cpu = dataclasses.replace(splits.train.settings, decode_device="cpu")
    crops = [CropSpec(2, 24, (0.3, 1.0)), CropSpec(2, 12, (0.1, 0.4))]
    for specs, shuffle in ((crops, True), (None, False)):
        worker = list(StreamLoader(splits.train, splits.train.settings, 5, crops=specs, shuffle=shuffle, seed=4))
        device = list(StreamLoader(splits.train, on_cpu, 5, crops=specs, shuffle=shuffle, seed=4))
        assert len(worker) == len(device) == 2
        for (va, la), (vb, lb) in zip(worker, device):
            va, vb = (va, vb) if specs else ((va,), (vb,))
            assert torch.equal(la, lb) and [v.shape for v in va] == [v.shape for v in vb]
            for a, b in zip(va, vb):
                assert (a.float() - b.float()).abs().mean() < 6.0  # of 255: same region, another filter


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: nvJPEG decode on side streams"))])
def test_decoding_ahead_in_threads_yields_the_batches_of_decoding_in_series(tmp_path, device):
    """dataset.decode_ahead=2 decodes the next batches in background threads (on side CUDA
    streams on a GPU) while the step runs: same views, same labels, same order as decoding in
    series, over two epochs and when the consumer stops mid-epoch (as a run does at max_steps)."""
    import dataclasses

    write_jpegs(tmp_path, {"a": 9, "b": 9}, size=(50, 70))
    splits = load(tmp_path, test_ratio=0.2, val_ratio=0)
    crops = [CropSpec(2, 20, (0.3, 1.0)), CropSpec(3, 10, (0.1, 0.4))]
    runs = {}
    for ahead in (0, 2):
        settings = dataclasses.replace(splits.train.settings, decode_device=device, decode_ahead=ahead)
        loader = StreamLoader(splits.train, settings, 3, crops=crops, seed=7, drop_last=False)
        batches = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            for views, labels in loader:  # each batch used on the training stream, as a step does
                batches.append(([v.float().mul(2).cpu() for v in views], labels))
        loader.set_epoch(2)
        for i, (views, labels) in enumerate(loader):  # stopped early: the queued batches are dropped cleanly
            batches.append(([v.float().mul(2).cpu() for v in views], labels))
            if i == 1:
                break
        runs[ahead] = batches
    assert len(runs[0]) == len(runs[2]) == 2 * len(loader) + 2
    for (va, la), (vb, lb) in zip(runs[0], runs[2]):
        assert torch.equal(la, lb) and len(va) == len(vb) == 5
        assert all(torch.equal(a, b) for a, b in zip(va, vb))
    with pytest.raises(ValueError, match="decode_ahead=-1.*>= 0"):
        load(tmp_path, loader="gpu", test_ratio=0.2, val_ratio=0, decode_ahead=-1)


def test_gpu_loader_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    write_jpegs(tmp_path, {"a": 4, "b": 4})
    splits = load(tmp_path, loader="gpu", test_ratio=0.25, val_ratio=0)
    with pytest.raises(RuntimeError, match="dataset.loader=gpu.*CUDA is not available.*dataset.loader=stream"):
        StreamLoader(splits.train, splits.train.settings, 2, crops=[CropSpec(2, 16, (0.2, 1.0))])


# ------------------------------------------------------------------ features read once per pipeline
def test_probes_share_features_of_the_same_weights_and_split(tmp_path, monkeypatch):
    from sslpipe import stages
    from sslpipe.backbones import SmallCNN
    from sslpipe.data import loaders
    from sslpipe.data.views import Normalize

    write_jpegs(tmp_path, {"a": 5, "b": 5})
    split = load(tmp_path, test_ratio=0.2, val_ratio=0).train
    reads = []
    real = loaders.eval_loader
    monkeypatch.setattr(loaders, "eval_loader", lambda *a, **kw: reads.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    net, norm = SmallCNN(3, 8, 16), Normalize([0.5] * 3, [0.25] * 3)
    first = stages.extract_features(net, split, norm, torch.device("cpu"), 4)
    again = stages.extract_features(net, split, norm, torch.device("cpu"), 4)  # knn, then linear probe
    assert len(reads) == 1 and torch.equal(first, again) and first.shape == (8, 16)
    with torch.no_grad():
        net.features[0][0].weight.add_(0.1)  # other weights (e.g. another random init): read again
    other = stages.extract_features(net, split, norm, torch.device("cpu"), 4)
    assert len(reads) == 2 and not torch.equal(other, first)


def test_listing_finds_what_torchvision_finds(tmp_path):
    """Nested folders, upper-case extensions, non-image files: the same files, labels and order
    as torchvision's make_dataset."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    write_jpegs(tmp_path, {"cat": 3, "dog": 2})
    (tmp_path / "dog" / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "dog" / "nested" / "deeper" / "x.PNG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "odd name ü.jpeg").write_bytes((tmp_path / "cat" / "0000.jpg").read_bytes())
    table, labels = files.list_class_folders(str(tmp_path), ["cat", "dog"])
    expected = make_dataset(str(tmp_path), {"cat": 0, "dog": 1}, extensions=IMG_EXTENSIONS)
    assert [(table[i], int(labels[i])) for i in range(len(table))] == expected
    assert len(expected) == 7


def test_cpu_training_applies_the_view_ops_in_the_workers_reproducibly(tmp_path):
    from sslpipe.data.views import AugmentSpec

    write_jpegs(tmp_path, {"a": 4, "b": 4})
    split = load(tmp_path, test_ratio=0.25, val_ratio=0).train
    flip = AugmentSpec(hflip=1.0, jitter_prob=0.0, grayscale_prob=1.0)  # always mirrored and grey

    def first(spec):
        loader = StreamLoader(split, split.settings, 6, crops=[CropSpec(2, 16, (0.3, 1.0), augment=spec)], seed=1)
        return next(iter(loader))[0]

    plain, grey, again = first(None), first(flip), first(flip)
    assert all(torch.equal(a, b) for a, b in zip(grey, again))  # a function of (seed, epoch, index)
    for p, g in zip(plain, grey):
        assert (g[:, 0] == g[:, 1]).all() and (g[:, 1] == g[:, 2]).all()  # grey: equal channels
        assert not (p[:, 0] == p[:, 1]).all()
        luma = (0.299 * p[:, 0].float() + 0.587 * p[:, 1].float() + 0.114 * p[:, 2].float()).flip(-1)
        assert (luma - g[:, 0].float()).abs().mean() < 2.0  # the same crop, mirrored, in grey


@pytest.mark.slow
def test_streamed_pretrain_under_two_gloo_ranks_reads_half_each(tmp_path):
    """torchrun, 2 processes on the CPU (gloo): each rank streams its own half of the epoch."""
    import socket

    from mlflow.tracking import MlflowClient

    write_jpegs(tmp_path / "data", {"a": 10, "b": 10})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "sslpipe", "stage=pretrain", "dataset=imagefolder",
                           f"dataset.root={tmp_path / 'data'}", "dataset.image_size=16", "dataset.loader=stream",
                           "dataset.workers=1", "device=cpu", "stage.pretrain.loop.max_steps=3", "stage.pretrain.batch_size=4",
                           "backbone.width=8", "backbone.num_features=32", "hydra.run.dir=outputs/ddp"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    # 20 images, 30 % held out: 14 in train, 7 a rank, one batch of 4 each
    assert "rank 0 of 2: 4 of 14 images per epoch (1 batches of 4)" in out, out[-3000:]
    assert "rank 1 of 2: 4 of 14 images per epoch (1 batches of 4)" in out, out[-3000:]
    assert "rank 0 left the process group" in out and "rank 1 left the process group" in out, out[-3000:]
    assert (tmp_path / "outputs" / "ddp" / "checkpoints" / "final.pt").exists()
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])[0]
    assert run.data.tags["sslpipe.world_size"] == "2" and run.data.tags["sslpipe.loader"] == "stream"


def test_worker_ops_leave_the_calling_process_rng_alone(tmp_path):
    """With dataset.workers=0 the view ops run in the training process: its RNG streams (which
    MAE / iBOT masks and the on-device ops draw from) must not be reseeded by them."""
    from sslpipe.data.views import AugmentSpec

    write_jpegs(tmp_path, {"a": 3, "b": 3})
    split = load(tmp_path, test_ratio=0.34, val_ratio=0).train
    loader = StreamLoader(split, split.settings, 2, crops=[CropSpec(2, 16, (0.3, 1.0), augment=AugmentSpec())], seed=1)
    torch.manual_seed(123)
    np.random.seed(123)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    list(loader)  # workers=0: in this process
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
