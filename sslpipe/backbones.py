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


class YatCNN(nn.Module):
    """A small CNN of YAT convolutions (the SIMO2 reference code's YatCNN), from the `nmn`
    package's torch layers.

    A YAT unit computes y = alpha * (w . x + b)^2 / (||x - w||^2 + eps) (Bouhsine, "Deep
    Learning 2.0: Artificial Neurons That Matter", 2024): it is non-linear by itself, so the
    blocks have no activation and no normalisation. Each width in `widths` is one 3x3 YAT
    convolution; a 2x2 average pool follows all but the last; global average pooling gives
    (B, widths[-1]) features. (B, in_chans, H, W) -> (B, num_features)."""

    def __init__(self, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128, 128), epsilon: float = 1e-5,
                 dropout: float = 0.0):
        super().__init__()
        from nmn.torch import YatConv2D

        chans = [in_chans, *widths]
        self.convs = nn.ModuleList(YatConv2D(cin, cout, 3, padding=1, epsilon=epsilon)
                                   for cin, cout in zip(chans[:-1], chans[1:]))
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.num_features = widths[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = self.drop(conv(x, deterministic=not self.training))
            if i < len(self.convs) - 1 and min(x.shape[-2:]) >= 2:  # 16 px digits keep a 2x2 map
                x = self.pool(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean((-2, -1))
