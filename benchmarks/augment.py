"""Two-view augmentation: lightly's per-sample PIL transforms (the CPU path of lightly's
examples) vs sslpipe's batched on-device path (`sslpipe.data.views.MultiView`), in images/s,
and a check that both draw from the same distribution.

Both sides use the same op set and ranges (SimCLR's CIFAR recipe, conf/dataset/cifar10.yaml:
crop scale 0.2-1, flip 0.5, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, no
blur) on the same 32 px uint8 images. The distribution check runs two-sample KS tests on
  - per-view mean and std of each channel (colour ops and crops together), and
  - the crop area, read off images whose red and green channels encode x and y (colour ops
    off on both sides): the ramps' slopes inside a view give the crop's width and height.

    python benchmarks/augment.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_device, header, make_npy, median, sync, table  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
SPEC = dict(crop_scale=(0.2, 1.0), crop_ratio=(0.75, 4 / 3), hflip=0.5, rotation=0.0, jitter_prob=0.8,
            brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale_prob=0.2, blur_prob=0.0,
            solarize_prob=0.0)


def lightly_transform(colour: bool = True):
    from lightly.transforms import SimCLRTransform

    # cj_strength 0.5 -> brightness/contrast/saturation 0.8 * 0.5 = 0.4, hue 0.2 * 0.5 = 0.1
    return SimCLRTransform(input_size=32, cj_prob=0.8 if colour else 0.0, cj_strength=0.5, min_scale=0.2,
                           random_gray_scale=0.2 if colour else 0.0, gaussian_blur=0.0, hf_prob=0.5,
                           normalize={"mean": MEAN, "std": STD})


def sslpipe_views(device: str, colour: bool = True):
    from sslpipe.data.views import AugmentSpec, MultiView, ViewPlan

    spec = dict(SPEC) if colour else {**SPEC, "jitter_prob": 0.0, "grayscale_prob": 0.0}
    return MultiView(32, ViewPlan.uniform(AugmentSpec(**spec), global_views=2), MEAN, STD).to(device)


def images(n: int, tmp: Path):
    import numpy as np

    make_npy(tmp, n, 32)
    return np.load(tmp / "train_images.npy")[:n]  # (n, 32, 32, 3) uint8


def coordinate_images(n: int):
    """Red = x, green = y (0..255 across the image), blue = 128: a crop box shows in the pixels."""
    import numpy as np

    ramp = np.linspace(0, 255, 32).round().astype(np.uint8)
    img = np.stack([np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)), np.full((32, 32), 128, np.uint8)], -1)
    return np.repeat(img[None], n, 0)


def crop_area(views):
    """Crop area as a share of the image, from coordinate images (normalised views): the red
    ramp's slope across the interior columns is (crop width / image width) x the source's
    slope, the green ramp's down the interior rows likewise for the height. Interior only:
    the border pixels depend on how a resize treats the crop's edge, not on the crop."""
    import torch

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (views.float().cpu() * std + mean) * 255
    side, step = x.shape[-1], 255 / 31  # the source ramp: 0..255 over 32 pixels
    lo, hi = 2, side - 3
    w = (x[:, 0, :, hi] - x[:, 0, :, lo]).abs().mean(1) / (hi - lo) / step * side / 32
    h = (x[:, 1, hi, :] - x[:, 1, lo, :]).abs().mean(1) / (hi - lo) / step * side / 32
    return (w * h).numpy()


def stats(views):
    import torch

    v = views.float().cpu()
    return torch.cat([v.mean((2, 3)), v.std((2, 3))], 1).numpy()  # (n, 6): mean and std per channel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--n", type=int, default=2048, help="images per timed round")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--check", type=int, default=4000, help="views per side for the KS tests (at most 2 n)")
    args = p.parse_args()

    import tempfile

    import torch
    from PIL import Image
    from scipy.stats import ks_2samp

    header("Two-view augmentation: lightly per-sample PIL (CPU) vs sslpipe batched on-device", args.device)
    tmp = Path(tempfile.mkdtemp(prefix="sslpipe-bench-"))
    arr = images(args.n, tmp)
    pil = [Image.fromarray(a) for a in arr]
    u8 = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    cpu_t, dev_t = lightly_transform(), sslpipe_views(args.device)

    def run_cpu():
        for i in range(0, args.n, args.batch):  # what a DataLoader worker does per batch: transform, collate
            torch.stack([v for img in pil[i:i + args.batch] for v in cpu_t(img)])

    def run_dev():
        for i in range(0, args.n, args.batch):
            dev_t(u8[i:i + args.batch].to(args.device, non_blocking=True))
        sync(args.device)

    run_cpu(), run_dev()  # warm-up
    cpu, dev = [], []
    for _ in range(args.rounds):
        t = time.perf_counter(); run_cpu(); cpu.append(args.n / (time.perf_counter() - t))
        t = time.perf_counter(); run_dev(); dev.append(args.n / (time.perf_counter() - t))
    threads = torch.get_num_threads()
    print(f"{args.n} images of 32 px per round, two views each, batches of {args.batch}; {args.rounds} rounds; "
          f"lightly's path in one process (a DataLoader with k workers multiplies it by at most k)\n")
    table(["path", "images/s (two views each, median)", "min", "max", "ratio vs lightly CPU"], [
        ["lightly SimCLRTransform per PIL image, 1 process", median(cpu), min(cpu), max(cpu), 1.0],
        [f"sslpipe MultiView batched on {args.device} ({threads} threads)" if args.device == "cpu"
         else f"sslpipe MultiView batched on {args.device}", median(dev), min(dev), max(dev), median(dev) / median(cpu)],
    ])

    # ---------------------------------------------------------------- same distribution?
    m = min(args.check // 2, len(pil))  # source images; two views each per side
    a = torch.stack([v for img in pil[:m] for v in cpu_t(img)])
    b = torch.cat([torch.cat(dev_t(u8[i:i + 512].to(args.device))) for i in range(0, m, 512)])
    sa, sb = stats(a), stats(b)
    coords = coordinate_images(m)
    cpu_plain, dev_plain = lightly_transform(colour=False), sslpipe_views(args.device, colour=False)
    ca = crop_area(torch.stack([v for img in coords for v in cpu_plain(Image.fromarray(img))]))
    cb = crop_area(torch.cat(dev_plain(torch.from_numpy(coords).permute(0, 3, 1, 2).contiguous().to(args.device))))
    rows = []
    names = [f"{s} {c}" for s in ("mean", "std") for c in ("R", "G", "B")]
    for j, name in enumerate(names):
        r = ks_2samp(sa[:, j], sb[:, j])
        rows.append([f"per-view {name}", f"{sa[:, j].mean():.3f} / {sb[:, j].mean():.3f}", f"{r.statistic:.3f}", f"{r.pvalue:.3g}"])
    r = ks_2samp(ca, cb)
    rows.append(["crop area (share of image)", f"{ca.mean():.3f} / {cb.mean():.3f}", f"{r.statistic:.3f}", f"{r.pvalue:.3g}"])
    print(f"distribution check: {len(a)} views per side from the same {m} images; two-sample KS test\n")
    table(["statistic", "mean: lightly / sslpipe", "KS D", "p-value"], rows)


if __name__ == "__main__":
    main()
