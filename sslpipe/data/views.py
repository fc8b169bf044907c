"""View augmentation, batched on the training device with per-sample random parameters
(kornia's augmentation ops, which follow torchvision's transforms), so that two CPU cores
do not starve the model. Input uint8 (B, C, H, W); output normalised float views."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AugmentSpec:
    """The `dataset.augment` block: ranges and probabilities of each op."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = 0.5
    rotation: float = 0.0
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    solarize_prob: float = 0.0


class Normalize(nn.Module):
    """uint8 (B, C, H, W) -> float, scaled to [0, 1], then (x - mean) / std."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std


class Augment(nn.Module):
    """One random view per image: resized crop, flip, rotation, colour jitter, grayscale,
    blur, solarize (the SimCLR / BYOL op set), then normalisation."""

    def __init__(self, size: int, spec: AugmentSpec, mean: list[float], std: list[float], crop: bool = True,
                 view_ops: bool = True):
        super().__init__()
        import kornia.augmentation as K

        from sslpipe.data.fastaug import ColorJitter, RandomResizedCrop  # batched, torchvision's semantics

        # crop=False: the streaming loader has cut the crop from the original image already;
        # view_ops=False: its workers applied the other ops too (CPU training), only normalise here
        ops: list[nn.Module] = [RandomResizedCrop((size, size), scale=tuple(spec.crop_scale),
                                                  ratio=tuple(spec.crop_ratio))] if crop else []
        if not view_ops:
            spec = AugmentSpec(hflip=0.0, jitter_prob=0.0, grayscale_prob=0.0)
        if spec.hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=spec.hflip))
        if spec.rotation > 0:
            ops.append(K.RandomRotation(degrees=spec.rotation, p=1.0))
        colour = len(mean) == 3
        if spec.jitter_prob > 0:
            ops.append(ColorJitter(spec.brightness, spec.contrast, spec.saturation if colour else 0.0,
                                     spec.hue if colour else 0.0, p=spec.jitter_prob))
        if spec.grayscale_prob > 0 and colour:
            ops.append(K.RandomGrayscale(p=spec.grayscale_prob))
        if spec.blur_prob > 0:
            kernel = max(3, (size // 10) | 1)  # ~10% of the image side, odd (SimCLR)
            ops.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=spec.blur_prob))
        if spec.solarize_prob > 0:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize_prob))
        self.ops = nn.Sequential(*ops)
        self.normalize = Normalize(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        return self.normalize(self.ops(x).clamp_(0.0, 1.0))


class MultiView(nn.Module):
    """`global_views` views at full size and `local_views` small crops (DINO's multi-crop).

    Input: uint8 (B, C, H, W) images, cropped here (the memory path), or the tuple of uint8
    crops that the streaming loader cut from the original images in `crops()` order
    (`crop=False`): the remaining ops run batched on the device either way."""

    def __init__(self, size: int, spec: AugmentSpec, mean: list[float], std: list[float], global_views: int = 2,
                 local_views: int = 0, local_size: int | None = None, local_scale: tuple[float, float] = (0.05, 0.4),
                 crop: bool = True, in_workers: bool = False):
        super().__init__()
        self.global_views, self.local_views = global_views, local_views
        self.size, self.local_size = size, local_size or max(4, size * 3 // 7)
        self.spec, self.local_scale, self.in_workers = spec, tuple(local_scale), in_workers
        self.local_spec = AugmentSpec(**{**spec.__dict__, "crop_scale": tuple(local_scale)})
        self.global_aug = Augment(size, spec, mean, std, crop=crop, view_ops=not in_workers)
        if local_views:
            self.local_aug = Augment(self.local_size, self.local_spec, mean, std, crop=crop, view_ops=not in_workers)

    def crops(self):
        """The crops a loader must cut for this module: global views, then local views (and,
        `in_workers`, the ops each view gets there)."""
        from sslpipe.data.stream import CropSpec

        ratio = tuple(self.spec.crop_ratio)
        out = [CropSpec(self.global_views, self.size, tuple(self.spec.crop_scale), ratio,
                        self.spec if self.in_workers else None)]
        if self.local_views:
            out.append(CropSpec(self.local_views, self.local_size, self.local_scale, ratio,
                                self.local_spec if self.in_workers else None))
        return out

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        # The views of one size in one batched call: the same independent per-image draws as
        # one call per view, with a fraction of the kernel launches.
        if isinstance(x, (tuple, list)):  # crops from the streaming loader
            views = list(self.global_aug(torch.cat(x[:self.global_views])).chunk(self.global_views))
            if self.local_views:
                views += list(self.local_aug(torch.cat(x[self.global_views:])).chunk(self.local_views))
            return views
        views = list(self.global_aug(x.repeat(self.global_views, 1, 1, 1)).chunk(self.global_views))
        if self.local_views:
            views += list(self.local_aug(x.repeat(self.local_views, 1, 1, 1)).chunk(self.local_views))
        return views
