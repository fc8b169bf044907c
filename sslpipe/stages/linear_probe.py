"""stage=linear_probe: a linear classifier on the frozen encoder, by one of two protocols
(`stage.linear_probe.protocol`, logged as `protocol.protocol`, so that sslpipe.report keeps them apart):

- `cached` (default, fast): on features extracted once and cached (the skeleton and fit loop
  shared with the other probes: sslpipe.stages.probe).
- `augmented` (the published protocol: DINO's eval_linear, MAE's linear probing): SGD with
  momentum on the features of a fresh random crop + flip of each train image every epoch,
  the backbone frozen in eval mode; a BatchNorm without affine parameters before the layer
  (MAE, appendix A.2), folded into the saved layer afterwards."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.tensorfiles import write_tensors
from sslpipe.stages.context import Context, StageResult
from sslpipe.engine import LrScale
from sslpipe.stages.probe import Fitted, fit_head, head_lr_scale, run_probe


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, batch_size: int, lr: float,
               weight_decay: float, seed: int) -> nn.Linear:
    """Logistic regression on standardised features (`fit_head`). The standardisation is
    folded into the returned layer, so it applies to raw features."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    head = fit_head(nn.Linear(features.shape[1], num_classes), (features - mean) / std, labels, epochs, batch_size,
                    lr, weight_decay, seed)
    with torch.no_grad():  # W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m)
        head.weight.div_(std)
        head.bias.sub_(head.weight @ mean)
    return head


def fit_linear_augmented(backbone: nn.Module, split, normalize: nn.Module, ctx: Context) -> nn.Linear:
    """The published protocol's head (module docstring): `stage.linear_probe.augmented.{epochs, lr, momentum}`,
    lr per 256 images. Every rank fits the same head on all images from the same seed, as the
    cached probes do (nothing to average)."""
    from dataclasses import replace

    from sslpipe.data.loaders import is_streamed, training_loader
    from sslpipe.data.stream import CropSpec
    from sslpipe.data.views import Augment, AugmentSpec, base_spec

    cfg, st, device = ctx.cfg, ctx.settings, ctx.device
    aug_cfg = st.augmented
    data = base_spec(cfg.dataset.augment)  # the data set's crops and whether it flips, nothing else
    spec = replace(AugmentSpec(jitter_prob=0.0, grayscale_prob=0.0), crop_scale=data.crop_scale,
                   crop_ratio=data.crop_ratio, hflip=data.hflip)
    size, streamed = cfg.dataset.image_size, is_streamed(split)
    views = Augment(size, spec, list(cfg.dataset.norm.mean), list(cfg.dataset.norm.std), crop=not streamed).to(device)
    loader = training_loader(split, st.batch_size, [CropSpec(1, size, spec.crop_scale, spec.crop_ratio)], seed=cfg.seed,
                             drop_last=len(split) > st.batch_size, device=device)
    backbone = backbone.to(device).eval().requires_grad_(False)
    # momentum=None: running statistics are the plain average over every batch, exact for the fold
    head = nn.Sequential(nn.BatchNorm1d(backbone.num_features, affine=False, momentum=None),
                         nn.Linear(backbone.num_features, cfg.dataset.num_classes)).to(device)
    nn.init.normal_(head[1].weight, std=0.01)  # DINO's LinearClassifier
    nn.init.zeros_(head[1].bias)
    lr = LrScale(st.lr_scaling, st.batch_size)(aug_cfg.lr)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=aug_cfg.momentum, weight_decay=st.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, aug_cfg.epochs * max(1, len(loader)))
    torch.manual_seed(cfg.seed)
    for epoch in range(aug_cfg.epochs):
        loader.set_epoch(epoch)
        head.train()
        for images, labels in loader:
            images = images[0] if isinstance(images, (tuple, list)) else images
            with torch.no_grad():
                features = backbone(views(images.to(device)))
            loss = F.cross_entropy(head(features), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    bn, linear = head.eval()[0], head[1]
    folded = nn.Linear(linear.in_features, linear.out_features).to(device)
    with torch.no_grad():  # W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m)
        std = (bn.running_var + bn.eps).sqrt()
        folded.weight.copy_(linear.weight / std)
        folded.bias.copy_(linear.bias - folded.weight @ bn.running_mean)
    return folded.cpu()


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.settings
    lr_scale = head_lr_scale(st)
    if st.protocol not in ("cached", "augmented"):
        raise ValueError(f"stage.linear_probe.protocol={st.protocol!r}: linear_probe's protocols are cached (features extracted "
                         "once, fast) and augmented (SGD on fresh crops of the frozen encoder, DINO / MAE)")

    def save(head: nn.Linear) -> Fitted:
        path = ctx.run_dir / "linear_head.safetensors"
        write_tensors({"weight": head.weight, "bias": head.bias}, path)
        return Fitted(lambda x: head(x).argmax(1), head=path)

    if st.protocol == "augmented":
        aug = st.augmented
        return run_probe(ctx, dict(protocol="augmented", epochs=aug.epochs, lr=aug.lr, momentum=aug.momentum,
                                   weight_decay=st.weight_decay), None, "linear probe (augmented)",
                         lr_scale=LrScale(st.lr_scaling, st.batch_size),
                         fit_images=lambda backbone, split, norm: save(fit_linear_augmented(backbone, split, norm, ctx)))

    def fit(features: torch.Tensor, labels: torch.Tensor) -> Fitted:
        return save(fit_linear(features, labels, cfg.dataset.num_classes, st.epochs, st.batch_size, lr_scale(st.lr),
                               st.weight_decay, cfg.seed))

    return run_probe(ctx, dict(protocol="cached", epochs=st.epochs, lr=st.lr, weight_decay=st.weight_decay), fit,
                     "linear probe", lr_scale=lr_scale)
