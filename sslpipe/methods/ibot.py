"""iBOT: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022."""

from __future__ import annotations

import math

import torch
from lightly.loss import DINOLoss, IBOTPatchLoss
from lightly.models.modules import MaskedVisionTransformerTIMM
from lightly.models.utils import random_block_mask
from torch import nn

from sslpipe.methods.dino import cancel_last_layer, dino_heads, teacher_temperature
from sslpipe.methods.ema import ema_update, frozen_copy, momentum_at
from sslpipe.methods.vit import patch_size, require_vit
from sslpipe.seeding import GlobalDraws


@torch.no_grad()
def global_token_mean(x: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    """The mean of `x` over `dim` and over every rank's tokens, each token weighing alike.
    Replaces lightly's `center_mean` for the patch centre: that one averages the ranks' own
    means, which weighs a rank's masked patches by how few it drew and so depends on the
    number of ranks."""
    total = x.sum(dim=dim, keepdim=True)
    count = torch.tensor([float(math.prod(x.shape[d] for d in dim))], device=x.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return total / count


class IBOT(nn.Module):
    """DINO on the class token plus masked image modelling on the patch tokens: the student
    sees the two global views with blocks of patches replaced by a mask token and predicts,
    for each masked patch, the EMA teacher's (centred, sharpened) distribution for the same
    patch unmasked. Class-token loss: lightly's `DINOLoss`; patch loss: `IBOTPatchLoss`; the
    ViT wrapper that swaps in mask tokens: `MaskedVisionTransformerTIMM`; masks:
    `random_block_mask` (a `batch_mask_ratio` share of images get 10-50 % of patches masked).

    Shapes: views 2 x (B, C, H, W) -> tokens (2B, 1 + N, D) -> class head (2B, output_dim),
    patch head (masked tokens, output_dim). An iBOT-style report's recipe: ViT-S/4 on 32 px CIFAR-10,
    100 epochs (conf/experiment/ibot_vits4_cifar10.yaml). `shared_head`: one head for the class
    and the patch tokens (the paper's ViT recipes, --shared_head true), else two; `local_views`
    small crops go through the student's class head only, against the teacher's global views
    (multi-crop, as DINO); the patch centre is the mean teacher output over every patch token
    of the global views, masked or not (the paper's update_center), over all ranks; teacher T
    0.04 -> 0.07, momentum 0.996 -> 1 (paper).

    Under DDP the patch head's BatchNorm (`batch_norm: true`) normalises each rank's masked
    patch tokens, whose number varies per rank: N ranks and one process differ there (and
    only there; tests/test_equivalence.py compares them with `batch_norm=false`).
    """

    global_views, needs_labels, needs_vit = 2, False, True
    evaluated_encoder = "teacher"  # as DINO: the paper evaluates the teacher (ema.saved_encoder)
    objective = "ibot_masked_self_distillation"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 output_dim: int = 8192, patch_loss_weight: float = 1.0, batch_mask_ratio: float = 0.5,
                 min_image_mask_ratio: float = 0.1, max_image_mask_ratio: float = 0.5,
                 student_temperature: float = 0.1, warmup_teacher_temperature: float = 0.04,
                 teacher_temperature: float = 0.07, warmup_teacher_fraction: float = 0.3,
                 center_momentum: float = 0.9, momentum_start: float = 0.996, momentum_end: float = 1.0,
                 batch_norm: bool = False, freeze_last_layer_fraction: float = 0.0, pos_embed: str = "learn",
                 shared_head: bool = True, norm_last_layer: bool = True, local_views: int = 0):
        super().__init__()
        require_vit(backbone, "ibot")
        self.backbone, self.local_views, self.shared_head = backbone, local_views, shared_head
        # wraps (and shares) the backbone's weights; position embedding learnt (the paper, as DINO's
        # ViTs) rather than lightly's default fixed sine-cosine (MAE's choice)
        self.student = MaskedVisionTransformerTIMM(vit=backbone, pos_embed_initialization=pos_embed)
        head = (backbone.num_features, proj_hidden_dim, bottleneck_dim, output_dim)
        self.projector, self.teacher_projector = dino_heads(*head, batch_norm=batch_norm,
                                                            norm_last_layer=norm_last_layer)
        self.patch_head, self.teacher_patch_head = (self.projector, self.teacher_projector) if shared_head else \
            dino_heads(*head, batch_norm=batch_norm, norm_last_layer=norm_last_layer)
        self.freeze_last_layer_fraction = freeze_last_layer_fraction
        self.teacher = frozen_copy(self.student)
        self.cls_loss = DINOLoss(output_dim=output_dim, student_temp=student_temperature,
                                 center_momentum=center_momentum)
        self.patch_loss = IBOTPatchLoss(output_dim=output_dim, student_temp=student_temperature,
                                        center_momentum=center_momentum)
        self.patch_loss.center._center_fn = global_token_mean  # lightly's hook for the centre statistic
        self.patch_loss_weight = patch_loss_weight
        self.mask_ratios = (batch_mask_ratio, min_image_mask_ratio, max_image_mask_ratio)
        self.temperatures = (warmup_teacher_temperature, teacher_temperature, warmup_teacher_fraction)
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.draws = GlobalDraws()  # masks drawn over the global batch (sslpipe.seeding)

    def block_mask(self, view: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One view (B, C, H, W) -> (bool (B, H/p, W/p), True where a patch is masked: this rank's
        rows of block masks drawn for the view's whole global batch; whether any image of that
        global batch drew a mask, which every rank knows alike)."""
        p = patch_size(self.backbone)
        grid = (-(-view.shape[-2] // p), -(-view.shape[-1] // p))
        batch, low, high = self.mask_ratios
        total, mine = self.draws.rows(len(view))
        with self.draws.python_random():  # lightly draws from the `random` module
            mask = random_block_mask((total, *grid), batch_mask_ratio=batch, min_image_mask_ratio=low,
                                     max_image_mask_ratio=high, min_num_masks_per_block=1)
        return mask[mine].to(view.device), bool(mask.any())

    @property
    def teacher_backbone(self) -> nn.Module:
        """The teacher's plain ViT (what a run saves and evaluates by default)."""
        return self.teacher.vit

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        images = torch.cat(views[: self.global_views])
        masks, drawn = zip(*(self.block_mask(v) for v in views[: self.global_views]))
        mask = torch.cat(masks)
        patches = mask.flatten(1)  # (2B, N)
        prefix = torch.zeros(len(images), self.backbone.num_prefix_tokens, dtype=torch.bool, device=images.device)
        t_temp = teacher_temperature(progress, *self.temperatures)
        with torch.no_grad():
            t_tokens = self.teacher.encode(images)
            t_cls = self.teacher_projector(t_tokens[:, 0])
        s_tokens = self.student.encode(images, mask=torch.cat([prefix, patches], dim=1))
        s_cls = list(self.projector(s_tokens[:, 0]).chunk(2))
        s_cls += [self.projector(self.student.encode(v)[:, 0]) for v in views[self.global_views:]]  # local crops
        loss = self.cls_loss(list(t_cls.chunk(2)), s_cls, teacher_temp=t_temp)
        if not any(drawn):  # the whole global batch drew no mask: no patch loss on any rank, but
            # every trainable parameter takes part in the step (DDP reduces them all)
            return loss + 0.0 * sum(p.sum() for p in self.patch_head.parameters() if p.requires_grad)
        if not patches.any():  # the patch centre is all-reduced: every rank must bring masked patches
            raise RuntimeError(f"iBOT: this rank's {len(images)} images drew no masked patch while other ranks' did; "
                               f"raise stage.pretrain.batch_size or method.batch_mask_ratio (a rank's share of the "
                               f"masked images is drawn at random)")
        n = self.backbone.num_prefix_tokens
        with torch.no_grad():  # every patch token: the centre is their mean (below)
            t_patch = self.teacher_patch_head(t_tokens[:, n:].flatten(0, 1)).unflatten(0, (len(images), -1))
        s_patch = self.patch_head(s_tokens[:, n:][patches])
        centre = self.patch_loss.center
        kept = centre.center.clone()
        patch_loss = self.patch_loss(t_patch[patches], s_patch, mask=mask, teacher_temp=t_temp)
        # lightly's loss updates the centre from the masked tokens it is given; iBOT's update_center
        # averages the teacher's output over every patch token of the global views
        centre.center = kept
        centre.update(t_patch.flatten(0, 1))
        return loss + self.patch_loss_weight * patch_loss

    def before_optimizer_step(self, progress: float) -> None:
        heads = [self.projector] if self.shared_head else [self.projector, self.patch_head]
        cancel_last_layer(heads, progress, self.freeze_last_layer_fraction)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        m = momentum_at(progress, self.momentum_start, self.momentum_end)
        ema_update(self.student, self.teacher, m)
        ema_update(self.projector, self.teacher_projector, m)
        if not self.shared_head:  # a shared head is one module: one update
            ema_update(self.patch_head, self.teacher_patch_head, m)
