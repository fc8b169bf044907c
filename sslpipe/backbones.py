"""Backbones with timm's interface: `num_features`, and `forward(x)` -> (B, num_features)
pooled features with no classifier head (as `timm.create_model(name, num_classes=0)`).
`forward_features(x)` keeps the spatial map for dense heads."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A small CPU-friendly CNN: four 3x3 conv-BN-ReLU blocks (two of stride 2), global
    average pool. (B, in_chans, H, W) -> (B, num_features); about 0.1 M parameters at
    the defaults, so a digits pipeline runs in minutes on two CPU cores."""

    def __init__(self, in_chans: int = 3, width: int = 32, num_features: int = 128):
        super().__init__()
        self.num_features = num_features
        self.features = nn.Sequential(
            _conv_bn_relu(in_chans, width, 1),
            _conv_bn_relu(width, 2 * width, 2),
            _conv_bn_relu(2 * width, 2 * width, 1),
            _conv_bn_relu(2 * width, num_features, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x)).flatten(1)


def TimmBackbone(model_name: str, in_chans: int = 3, cifar_stem: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model(model_name, num_classes=0, in_chans=...)`; with `cifar_stem` a
    ResNet's 7x7/2 stem + max-pool becomes one 3x3/1 conv, the usual change for 32 px
    inputs (SimCLR, appendix B.9). State-dict keys stay timm's."""
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    if cifar_stem:
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
            raise ValueError(
                f"cifar_stem=true needs a ResNet-style model with conv1 and maxpool; "
                f"'{model_name}' has neither. Set backbone.cifar_stem=false."
            )
        stem_out = model.conv1.out_channels
        model.conv1 = nn.Conv2d(in_chans, stem_out, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model
