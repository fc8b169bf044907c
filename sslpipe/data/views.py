"""View augmentation, batched on the training device with per-sample random parameters
(kornia's augmentation ops, which follow torchvision's transforms), so that two CPU cores
do not starve the model. Input uint8 (B, C, H, W); output normalised float views."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

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


SPEC_KEYS = tuple(AugmentSpec.__dataclass_fields__)


@dataclass(frozen=True)
class ViewPlan:
    """What each view of a method gets: one spec per global view, and one for all local crops."""

    global_specs: tuple[AugmentSpec, ...]
    local_views: int = 0
    local_spec: AugmentSpec | None = None
    local_size: int | None = None

    @classmethod
    def uniform(cls, spec: AugmentSpec, global_views: int = 2, local_views: int = 0,
                local_scale: tuple[float, float] = (0.05, 0.4), local_size: int | None = None) -> "ViewPlan":
        """Every global view alike (`spec`); local crops of `spec` at `local_scale`."""
        local = replace(spec, crop_scale=tuple(local_scale)) if local_views else None
        return cls((spec,) * global_views, local_views, local, local_size)


def base_spec(augment: Mapping) -> AugmentSpec:
    """The data set's own view (`dataset.augment` without its `fixed` list): fine-tuning's
    augmentation, and what a method's views start from."""
    plain = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in augment.items() if k != "fixed"}
    unknown = sorted(set(plain) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"dataset.augment.{unknown[0]} is not a view op; the ops are {', '.join(SPEC_KEYS)}")
    return AugmentSpec(**plain)


def override_spec(spec: AugmentSpec, changes: Mapping | None, where: str) -> AugmentSpec:
    """`spec` with the ops in `changes` set; a key that is not a view op raises, naming `where`.key."""
    changes = dict(changes or {})
    for key in changes:
        if key not in SPEC_KEYS:
            raise ValueError(f"{where}.{key} is not a view op; the ops are {', '.join(SPEC_KEYS)}")
    return replace(spec, **{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in changes.items()})


def plan_views(augment: Mapping, views: Mapping | None, method: str, global_views: int,
               takes_local_views: bool) -> ViewPlan:
    """Each view's ops: the method's views (`method.views`, as its paper sets them) over the
    data set's own view (`dataset.augment`), except for what the data set fixes
    (`dataset.augment.fixed`: e.g. no flips of digits, no blur at 16 px), which every global
    view keeps as the data set has it. Local crops keep their own scale and size.

    `views` keys: global_views, local_views, local_size (null: 3/7 of the image, DINO's 96 of
    224 px), local_crop_scale, common (ops of every view), per_view (one mapping per global
    view), local (ops of the local crops)."""
    base = base_spec(augment)
    fixed = list(augment.get("fixed") or [])
    for key in fixed:
        if key not in SPEC_KEYS:
            raise ValueError(f"dataset.augment.fixed names {key!r}, not a view op; the ops are {', '.join(SPEC_KEYS)}")
    views = dict(views or {})
    known = {"global_views", "local_views", "local_size", "local_crop_scale", "common", "per_view", "local"}
    for key in views:
        if key not in known:
            raise ValueError(f"method.views.{key} is not a views setting; the settings are {', '.join(sorted(known))}")
    count = views.get("global_views", global_views)
    if count != global_views:
        raise ValueError(f"method.views.global_views={count}: {method} takes {global_views} global views")
    local_views = int(views.get("local_views") or 0)
    if local_views < 0 or (local_views and not takes_local_views):
        raise ValueError(f"method.views.local_views={local_views}: {method} takes "
                         + ("a count >= 0" if takes_local_views else "no local crops (0)"))
    common = override_spec(base, views.get("common"), "method.views.common")
    per_view = list(views.get("per_view") or [{}] * count)
    if len(per_view) != count:
        raise ValueError(f"method.views.per_view has {len(per_view)} entries; {method} takes {count} global views")
    data_kept = {k: getattr(base, k) for k in fixed}
    specs = tuple(replace(override_spec(common, one, f"method.views.per_view[{i}]"), **data_kept)
                  for i, one in enumerate(per_view))
    local = None
    if local_views:
        scale = tuple(views.get("local_crop_scale") or (0.05, 0.4))
        local = replace(override_spec(common, views.get("local"), "method.views.local"),
                        **{k: v for k, v in data_kept.items() if k != "crop_scale"}, crop_scale=scale)
    return ViewPlan(specs, local_views, local, views.get("local_size"))


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
    """The global views at full size, then the local crops (DINO's multi-crop), each with its
    own ops (`ViewPlan`: e.g. BYOL's view 1 always blurred, view 2 rarely, sometimes solarized).

    Input: uint8 (B, C, H, W) images, cropped here (the memory path), or the tuple of uint8
    crops that the streaming loader cut from the original images in `crops()` order
    (`crop=False`): the remaining ops run batched on the device either way."""

    def __init__(self, size: int, plan: ViewPlan, mean: list[float], std: list[float], crop: bool = True,
                 in_workers: bool = False):
        super().__init__()
        self.global_views, self.local_views = len(plan.global_specs), plan.local_views
        self.size, self.local_size = size, plan.local_size or max(4, size * 3 // 7)
        self.plan, self.in_workers = plan, in_workers
        # alike global views go through one batched call: the same independent per-image draws as
        # one call per view, with a fraction of the kernel launches
        self.alike = len(set(plan.global_specs)) == 1
        specs = plan.global_specs[:1] if self.alike else plan.global_specs
        self.global_augs = nn.ModuleList(Augment(size, s, mean, std, crop=crop, view_ops=not in_workers) for s in specs)
        if self.local_views:
            self.local_aug = Augment(self.local_size, plan.local_spec, mean, std, crop=crop, view_ops=not in_workers)

    def crops(self):
        """The crops a loader must cut for this module: global views, then local views (and,
        `in_workers`, the ops each view gets there)."""
        from sslpipe.data.stream import CropSpec

        def cut(count: int, size: int, spec: AugmentSpec) -> CropSpec:
            return CropSpec(count, size, tuple(spec.crop_scale), tuple(spec.crop_ratio), spec if self.in_workers else None)

        specs = self.plan.global_specs
        out = [cut(len(specs), self.size, specs[0])] if self.alike else [cut(1, self.size, s) for s in specs]
        if self.local_views:
            out.append(cut(self.local_views, self.local_size, self.plan.local_spec))
        return out

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        n = self.global_views
        streamed = isinstance(x, (tuple, list))  # crops from the streaming loader
        if self.alike:
            views = list(self.global_augs[0](torch.cat(x[:n]) if streamed else x.repeat(n, 1, 1, 1)).chunk(n))
        else:
            views = [aug(x[i] if streamed else x) for i, aug in enumerate(self.global_augs)]
        if self.local_views:
            locals_ = torch.cat(x[n:]) if streamed else x.repeat(self.local_views, 1, 1, 1)
            views += list(self.local_aug(locals_).chunk(self.local_views))
        return views
