"""A convolutional (denoising) autoencoder: the reconstruction baseline of the SIMO2 reference
code. The decoder is written here; lightly has none for pooled CNN features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvDecoder(nn.Module):
    """(B, num_features) -> (B, out_chans, image_size, image_size): a linear map to a 4x4 map of
    `width` channels, then stride-2 transposed convs (BN, ReLU) until the map covers the image,
    a 3x3 conv to pixels, and a bilinear resize when the size is not 4 * 2^n."""

    def __init__(self, num_features: int, out_chans: int, image_size: int, width: int = 64):
        super().__init__()
        self.image_size, self.width = image_size, width
        self.fc = nn.Linear(num_features, width * 4 * 4)
        ups, size, chans = [], 4, width
        while size < image_size:
            nxt = max(16, chans // 2)
            ups += [nn.ConvTranspose2d(chans, nxt, 4, stride=2, padding=1), nn.BatchNorm2d(nxt), nn.ReLU(inplace=True)]
            size, chans = size * 2, nxt
        self.up = nn.Sequential(*ups)
        self.to_pixels = nn.Conv2d(chans, out_chans, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.to_pixels(self.up(F.relu(self.fc(features)).view(-1, self.width, 4, 4)))
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x


class Autoencoder(nn.Module):
    """Encode an augmented view with Gaussian noise added (std `noise_std`, in normalised pixel
    units), decode it, and regress the clean view: pixel MSE (the SIMO2 reference code's
    autoencoder reconstructs the clean image from an augmented one). The pooled features are the
    bottleneck.

    Shapes: view (B, C, H, W) -> features (B, num_features) -> reconstruction (B, C, H, W).
    """

    global_views, local_views, needs_labels = 1, 0, False
    objective = "reconstruction_mse"

    def __init__(self, backbone: nn.Module, image_size: int, in_chans: int, decoder_width: int = 64,
                 noise_std: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.projector = ConvDecoder(backbone.num_features, in_chans, image_size, decoder_width)
        self.noise_std = noise_std

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        clean = views[0]
        noisy = clean + self.noise_std * torch.randn_like(clean) if self.noise_std > 0 else clean
        return F.mse_loss(self.reconstruct(noisy), clean)

    def after_step(self, progress: float) -> None:
        pass
