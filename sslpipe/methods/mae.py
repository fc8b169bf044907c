"""MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from torch import nn

from sslpipe.methods.vit import patch_size, require_vit
from sslpipe.seeding import GlobalDraws


def token_mask(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_keep, idx_mask) over 1 + N tokens from uniform noise (B, 1 + N): the lowest-noise
    (1 - ratio) N patch tokens are kept, the class token always (MAE's per-sample shuffle;
    lightly's `random_token_mask` with the noise passed in, so that it comes from the stream
    shared by all ranks instead of each rank's own)."""
    num_keep = int((noise.shape[1] - 1) * (1 - mask_ratio)) + 1
    noise = noise.clone()
    noise[:, 0] = -1
    order = torch.argsort(noise, dim=1)
    return order[:, :num_keep], order[:, num_keep:]


class MAE(nn.Module):
    """Mask `mask_ratio` of the patches at random, encode only the visible ones with the ViT,
    and reconstruct the pixels of the masked ones with a light transformer decoder; MSE on
    masked patches only. Pieces: lightly's `MaskedVisionTransformerTIMM` (encoder),
    `MaskedVisionTransformerDecoderTIMM` (decoder, fixed sin-cos positions), `random_token_mask`,
    `patchify`, `get_at_index` / `set_at_index`.

    Shapes: view (B, C, H, W) -> visible tokens (B, 1 + N(1 - r), D) -> decoder
    (B, 1 + N, decoder_dim) -> predicted patches (B, N r, p*p*C).
    Defaults: mask ratio 0.75, decoder 512-d x 8 blocks (paper, Table 1); per-patch normalised
    targets (norm_pix_loss, paper sec. 4). The yaml keeps the decoder light for small data.
    """

    global_views, local_views, needs_labels, needs_vit = 1, 0, False, True
    objective = "mae_pixel_mse"

    def __init__(self, backbone: nn.Module, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True):
        super().__init__()
        require_vit(backbone, "mae")
        self.backbone = backbone
        self.encoder = MaskedVisionTransformerTIMM(vit=backbone)
        # The wrapper's mask token is for methods that feed masked tokens to the encoder (iBOT);
        # MAE's encoder sees the visible tokens only, and DDP refuses a trainable parameter
        # that gets no gradient.
        self.encoder.mask_token.requires_grad_(False)
        self.patch = patch_size(backbone)
        self.in_chans = backbone.patch_embed.proj.in_channels
        num_patches = backbone.patch_embed.num_patches
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(num_patches=num_patches, embed_dim=decoder_dim,
                                                          depth=decoder_depth, num_heads=decoder_heads,
                                                          num_prefix_tokens=backbone.num_prefix_tokens)
        self.prediction_head = nn.Linear(decoder_dim, self.patch ** 2 * self.in_chans)
        # Exported as the "projector": everything that turns features into pixels.
        self.projector = nn.ModuleDict({"embed": self.decoder_embed, "decoder": self.decoder,
                                        "head": self.prediction_head})
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.draws = GlobalDraws()  # masks drawn over the global batch (sslpipe.seeding)

    def token_mask(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx_keep, idx_mask) over the 1 + N tokens; the class token is always kept."""
        return token_mask(self.draws.rand(batch_size, self.encoder.sequence_length, device=device), self.mask_ratio)

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        images = views[0]
        idx_keep, idx_mask = self.token_mask(len(images), images.device)
        visible = self.decoder_embed(self.encoder.encode(images, idx_keep=idx_keep))
        tokens = utils.repeat_token(self.decoder.mask_token, (len(images), self.encoder.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, visible.type_as(tokens))
        decoded = self.decoder.decode(self.decoder.add_pos_embed(tokens))
        prediction = self.prediction_head(utils.get_at_index(decoded, idx_mask))
        n = self.backbone.num_prefix_tokens
        target = utils.get_at_index(utils.patchify(images, self.patch), idx_mask - n)  # patch indices skip the prefix
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return F.mse_loss(prediction, target)

    def after_step(self, progress: float) -> None:
        pass
