"""A synthetic data set generated from a seed: one simple shape per image (circle, square,
triangle, cross, star, ring; the class) with random colour, size, position, rotation and
texture, on a textured background, with its segmentation mask. It needs no files and no
network, so classification *and* segmentation run offline (`dataset=shapes`)."""

from __future__ import annotations

import numpy as np
import torch

from sslpipe.data.split import Split, Splits

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
TEXTURES = ("solid", "stripes", "checker", "noise")
MIN_CONTRAST = 0.35  # RGB distance (0..sqrt 3) between shape and background colours, so every mask is visible


def shape_mask(kind: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `kind` with circumradius `r`, in coordinates (x, y) already centred on
    the shape and rotated into its frame."""
    rho = np.hypot(x, y)
    if kind == "circle":
        return rho <= r
    if kind == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= r / np.sqrt(2)
    if kind == "triangle":  # equilateral: inside the three edges at distance r/2 from the centre
        return np.all([x * np.cos(a) + y * np.sin(a) <= r / 2 for a in np.deg2rad([-90, 30, 150])], axis=0)
    if kind == "cross":
        arm = 0.32 * r
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    if kind == "star":  # five points: the radius swings between 0.45 r and r with the angle
        return rho <= r * (0.725 + 0.275 * np.cos(5 * np.arctan2(y, x)))
    if kind == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    raise ValueError(f"unknown shape '{kind}'; valid: {', '.join(SHAPES)}")


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    while True:
        fg, bg = rng.random(3), rng.random(3)
        if np.linalg.norm(fg - bg) >= MIN_CONTRAST:
            return fg, bg


def _texture(kind: str, base: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float image of colour `base` with a texture: plain, stripes, checks or noise."""
    if kind == "solid":
        shade = np.ones_like(x)
    elif kind == "stripes":
        a, period = rng.uniform(0, np.pi), rng.uniform(3, 7)
        shade = 0.75 + 0.25 * np.sign(np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period))
    elif kind == "checker":
        cell = rng.uniform(2, 5)
        shade = np.where((np.floor(x / cell) + np.floor(y / cell)) % 2 == 0, 1.0, 0.6)
    else:
        shade = 1.0 + 0.2 * rng.standard_normal(x.shape)
    return base[None, None, :] * shade[..., None]


def draw(label: int, size: int, rng: np.random.Generator, shapes: tuple[str, ...] = SHAPES) -> tuple[np.ndarray, np.ndarray]:
    """One image uint8 (size, size, 3) and its mask uint8 (size, size), foreground 1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    r = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(r * 0.8, size - r * 0.8, size=2)  # mostly inside the frame
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = xx - cx, yy - cy
    x, y = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    mask = shape_mask(shapes[label], x, y, r)
    fg, bg = _colour_pair(rng)
    background = _texture(str(rng.choice(TEXTURES)), bg, xx, yy, rng)
    g = rng.uniform(-0.25, 0.25, size=2)  # a lighting gradient across the background
    background *= (1 + (g[0] * (xx - size / 2) + g[1] * (yy - size / 2)) / size)[..., None]
    image = np.where(mask[..., None], _texture(str(rng.choice(TEXTURES)), fg, x, y, rng), background)
    image += 0.03 * rng.standard_normal(image.shape)  # sensor noise
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), mask.astype(np.uint8)


def make_split(n: int, size: int, num_classes: int, rng: np.random.Generator) -> Split:
    """`n` images with balanced, shuffled labels 0..num_classes-1."""
    labels = rng.permutation(np.arange(n) % num_classes)
    drawn = [draw(int(c), size, rng, SHAPES[:num_classes]) for c in labels]
    images = np.stack([d[0] for d in drawn]).transpose(0, 3, 1, 2)
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                 torch.from_numpy(np.stack([d[1] for d in drawn])))


def load_shapes(image_size: int = 32, num_classes: int = 6, train_size: int = 3000, val_size: int = 600,
                test_size: int = 1200, seed: int = 0) -> Splits:
    """Train / val / test splits drawn from independent streams of one seed: the same seed
    gives the same images, and changing one split's size leaves the others as they were."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"shapes: num_classes={num_classes} must be in 2..{len(SHAPES)} ({', '.join(SHAPES)})")
    if image_size < 8:
        raise ValueError(f"shapes: image_size={image_size} is too small to draw a shape; use >= 8")
    split = lambda i, n: make_split(n, image_size, num_classes, np.random.default_rng([seed, i]))  # noqa: E731
    return Splits(train=split(0, train_size), val=split(1, val_size) if val_size else None, test=split(2, test_size),
                  classes=list(SHAPES[:num_classes]))
