"""What the masked-image methods (iBOT, MAE) need to know about a timm ViT backbone."""

from __future__ import annotations

from torch import nn


def is_vit(backbone: nn.Module) -> bool:
    """True for timm's VisionTransformer, the class lightly's masked ViT wrappers accept."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(backbone, VisionTransformer)


def patch_size(vit: nn.Module) -> int:
    size = vit.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def require_vit(backbone: nn.Module, method: str) -> None:
    """Fail in the constructor too (not only in stage=pretrain), naming what fits."""
    if not is_vit(backbone):
        raise ValueError(f"{method} needs a ViT backbone (a timm VisionTransformer, e.g. backbone=vit_tiny); "
                         f"got {type(backbone).__name__}")
