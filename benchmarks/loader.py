"""Two-view 224 px training batches per second from ImageNet-shaped JPEGs: sslpipe's streaming
loader against torchvision's `ImageFolder` + `DataLoader` with the same SimCLR transforms and
the same number of workers, and against sslpipe's memory path on a set that fits in memory.

- torchvision: per sample in the workers, twice: RandomResizedCrop(224, scale 0.2-1),
  horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1; p 0.8), grayscale (p 0.2), Gaussian
  blur (23 px, sigma 0.1-2; p 0.5), to tensor, normalise.
- stream, CPU training: the workers decode, cut both crops from the original image and apply
  the other ops per PIL image (torchvision's, lightly's PIL blur); the training process only
  normalises. This is what `stage=pretrain` does on the CPU.
- stream, GPU training: the workers decode and cut the crops; flip, jitter, grayscale, blur and
  normalisation run batched in the training process (`MultiView`): on a GPU there, here on
  the same two CPU cores as the workers, so this row shows what the workers leave to the GPU.
- memory: the images decoded once into a uint8 tensor at 224 px; crops and the rest batched.
Sides alternate round by round, each built afresh and its workers shut down after its timing
(prefetched batches of one side would otherwise use the CPU while the next is timed); figures
are images (not views) per second, timed after a few batches, median of rounds. The memory
side's one-off decode at load is not timed.

    python benchmarks/loader.py --workdir /tmp/sslpipe-scale --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, table  # noqa: E402
from _imagenet_like import make_pool, make_tree  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def torchvision_loader(root: Path, batch: int, workers: int):
    import torch
    from torchvision import datasets, transforms as T

    one = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                     T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=0.5), T.ToTensor(), T.Normalize(MEAN, STD)])
    data = datasets.ImageFolder(str(root / "train"), transform=lambda im: (one(im), one(im)))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)

    def batches():
        for views, labels in loader:
            yield views
    return batches


def sslpipe_loader(root: Path, batch: int, workers: int, loader_kind: str, in_workers: bool = False):
    import torch

    from sslpipe.data.imagefolder import load_imagefolder
    from sslpipe.data.loaders import training_loader
    from sslpipe.data.views import AugmentSpec, MultiView, ViewPlan

    splits = load_imagefolder(str(root), image_size=224, loader=loader_kind, workers=workers, memory_budget_gb=100,
                              val_ratio=0, test_ratio=0.01)
    spec = AugmentSpec(crop_scale=(0.2, 1.0), blur_prob=0.5)
    views = MultiView(224, ViewPlan.uniform(spec, global_views=2), MEAN, STD, crop=loader_kind == "memory",
                      in_workers=in_workers)
    loader = training_loader(splits.train, batch, views.crops(), seed=0)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for images, labels in loader:
                with torch.no_grad():
                    yield views(images)
            epoch += 1
    return batches


def measure(make_side, batches: int, skip: int, batch: int) -> float:
    """Images/s of a freshly built side, timed after `skip` batches; its workers are shut down
    before it returns, so batches they had prefetched do not use CPU while the next side runs."""
    import gc

    it = make_side()()
    for _ in range(skip):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - start)
    it.close()
    del it
    gc.collect()  # the DataLoader and its iterator go, and with them the worker processes
    time.sleep(1.0)
    return rate


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sslpipe-scale"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header("Loader: two-view 224 px SimCLR batches from JPEGs", "cpu")
    pool = make_pool(args.workdir / "pool", 2000)
    big, small = args.workdir / "imagenet_10000", args.workdir / "imagenet_2000"
    make_tree(big, 10, pool)
    make_tree(small, 2, pool)
    sides = {"torchvision ImageFolder + DataLoader": lambda: torchvision_loader(big, args.batch, args.workers),
             "sslpipe stream, view ops in the workers (CPU training)":
                 lambda: sslpipe_loader(big, args.batch, args.workers, "stream", in_workers=True),
             "sslpipe stream, view ops batched in the training process (GPU training)":
                 lambda: sslpipe_loader(big, args.batch, args.workers, "stream"),
             "sslpipe memory (2,000 images decoded at load)": lambda: sslpipe_loader(small, args.batch, args.workers,
                                                                                      "memory")}
    figures: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name, make in sides.items():
            figures[name].append(measure(make, args.batches, args.skip, args.batch))
            print(f"round {r + 1}: {name}: {figures[name][-1]:.1f} images/s", flush=True)
    base = statistics.median(figures["torchvision ImageFolder + DataLoader"])
    rows = [[name, round(statistics.median(v), 1), f"{statistics.median(v) / base:.2f}x",
             ", ".join(f"{x:.1f}" for x in v)] for name, v in figures.items()]
    print()
    table(["loader", "images/s (median)", "vs torchvision", "rounds"], rows)
    print(f"\n{args.workers} DataLoader workers, batch {args.batch}, {args.batches} batches timed after {args.skip}, "
          f"{args.threads} torch threads in the training process.")


if __name__ == "__main__":
    main()
