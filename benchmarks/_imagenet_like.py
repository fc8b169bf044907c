"""An ImageNet-1k-shaped folder for the data benchmarks: `<root>/train/n<class>/<name>.JPEG`,
1000 classes, JPEG quality 90, 300-500 px a side, built from a pool of distinct generated
images by hard links (the data path reads each link as its own file; the page cache may hold
a pool image once for all its links, which flatters reads from disk, not decoding)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def make_pool(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` distinct JPEGs: smooth colour fields plus noise and shapes (50-150 KB each at q90)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"pool_{i:05d}.JPEG" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    for path in paths:
        w, h = (int(v) for v in rng.integers(300, 501, 2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(xx / rng.uniform(10, 60) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(10, 60))
                         for _ in range(3)], -1)
        pixels = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 18, (h, w, 3))).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.ellipse([x0, y0, x0 + int(rng.integers(20, 160)), y0 + int(rng.integers(20, 160))],
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(path, quality=90)
    return paths


def make_tree(root: Path, per_class: int, pool: list[Path], classes: int = 1000) -> float:
    """`<root>/train/n<class>/<i>.JPEG` hard-linked into `pool`; returns seconds taken (0 if present)."""
    train = root / "train"
    done = root / ".complete"
    if done.exists() and done.read_text() == f"{classes}x{per_class}":
        return 0.0
    start = time.perf_counter()
    k = 0
    for c in range(classes):
        folder = train / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            target = folder / f"n{c:08d}_{i}.JPEG"
            if not target.exists():
                os.link(pool[k % len(pool)], target)
            k += 1
    done.write_text(f"{classes}x{per_class}")
    return time.perf_counter() - start
