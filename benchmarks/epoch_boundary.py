"""Data wait at the epoch boundary: the stream loader reading on across epochs (one DataLoader
iterator, `StreamLoader(across_epochs=True)`, the default for training) against restarting the
iterator every epoch (`across_epochs=False`, what a `for epoch: for batch in DataLoader` loop
does, and what sslpipe did before). A training step is stood in for by a sleep a little longer
than the workers need per batch, so in steady state the workers keep ahead and any wait is the
boundary's. On an H200 (ResNet-50 SimCLR, batch 512, 27 steps per epoch) a 10-step window with a
boundary in it waited 21-26 % of its time (docs/benchmarks.md); this script shows the mechanism
on any machine.

    python benchmarks/epoch_boundary.py                  # 2 CPU cores: 1 worker, batch 32 at 224 px
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table  # noqa: E402
from _imagenet_like import make_pool, make_tree  # noqa: E402


def run(split, settings, args, across: bool, step_s: float) -> dict:
    from sslpipe.data.stream import CropSpec, StreamLoader

    loader = StreamLoader(split, settings, args.batch, crops=[CropSpec(2, args.size, (0.08, 1.0))], seed=0,
                          across_epochs=across)
    waits: list[list[float]] = []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        waits.append([])
        t = time.perf_counter()
        for _ in loader:
            waits[-1].append(time.perf_counter() - t)
            time.sleep(step_s)  # the training step
            t = time.perf_counter()
    loader.close()
    later = [w for epoch in waits[1:] for w in epoch]  # epoch 0 includes starting the workers
    boundary = [epoch[0] for epoch in waits[1:]]
    return {"boundary_wait_s": sum(boundary) / len(boundary), "wait_share": sum(later) / (sum(later) + len(later) * step_s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400, help="JPEGs in the training folder (300-500 px)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", default="auto", help="DataLoader workers (auto: the CPUs less one)")
    p.add_argument("--slack", type=float, default=1.3, help="step time = slack x the workers' time per batch")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    from sslpipe.data.imagefolder import load_imagefolder
    from sslpipe.data.stream import worker_count

    header("Data wait at the epoch boundary: reading on across epochs vs a new iterator per epoch", "cpu")
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="sslpipe-boundary-"))
    pool = make_pool(tmp / "pool", min(args.images, 256))
    make_tree(tmp / "jpegs", args.images // 4, pool, classes=4)
    splits = load_imagefolder(str(tmp / "jpegs"), image_size=args.size, loader="stream", workers=args.workers,
                              test_ratio=0.0001, val_ratio=0, index_dir=str(tmp / "index"))
    split, settings = splits.train, splits.train.settings
    workers = worker_count(settings.workers)
    per_batch = _time_per_batch(split, settings, args)  # what the step must exceed for the workers to keep ahead
    step_s = args.slack * per_batch / max(1, workers)
    print(f"{len(split)} training images, batch {args.batch}, {len(split) // args.batch} steps per epoch, "
          f"{workers} worker(s); workers' time per batch {per_batch:.2f} s (one worker), step stood in for by "
          f"{step_s:.2f} s of sleep", flush=True)
    rows = []
    for across in (False, True):
        r = run(split, settings, args, across, step_s)
        rows.append(["one iterator across epochs (sslpipe)" if across else "a new iterator per epoch",
                     f"{r['boundary_wait_s']:.2f}", f"{100 * r['wait_share']:.1f} %"])
    print()
    table(["stream loader", "wait for an epoch's first batch (s)", f"data wait, epochs 1-{args.epochs - 1}"], rows)
    print(f"\nepochs: {args.epochs}; epoch 0 (workers starting) left out")


def _time_per_batch(split, settings, args) -> float:
    """One worker's seconds per batch: the crops of a few batches made in this process."""
    from sslpipe.data.stream import CropSpec, FileDataset, TrainCrops

    dataset = FileDataset(split, TrainCrops([CropSpec(2, args.size, (0.08, 1.0))], "RGB"), seed=0)
    n = min(len(split), 3 * args.batch)
    t = time.perf_counter()
    for i in range(n):
        dataset[(i, 0)]
    return (time.perf_counter() - t) / n * args.batch


if __name__ == "__main__":
    main()
