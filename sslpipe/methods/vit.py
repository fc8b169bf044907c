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


def require_vit(backbone: nn.Module, method: str, backbone_name: str | None = None) -> None:
    """The one ViT check: stage=pretrain calls it before reading data, the method's constructor
    again (for a method built outside a stage). The error names the ViT backbone options."""
    from sslpipe.validate import ConfigError

    if not is_vit(backbone):
        raise ConfigError(f"{method} needs a ViT backbone ({', '.join(vit_backbones())}); "
                          f"got {backbone_name or type(backbone).__name__}")


def vit_backbones() -> list[str]:
    """The backbone options (conf/backbone/*.yaml) that build a timm ViT."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    found = []
    for path in sorted(files("sslpipe.conf").joinpath("backbone").iterdir(), key=lambda p: p.name):
        if path.name.endswith(".yaml"):
            node = OmegaConf.create(path.read_text())
            if str(node.get("model_name", "")).startswith(("vit_", "deit_")):
                found.append(path.name[:-5])
    return found
