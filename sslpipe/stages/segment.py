"""stage=segment: binary segmentation with a small convolutional head on the pretrained
backbone's spatial features, upsampled to the mask size (as SimCLR ResNet-50 backbones are
reused for Oxford-IIIT Pet segmentation: IoU and F1, BCE or Dice loss, data ratio). The
backbone is fine-tuned at `backbone_lr` (or frozen with `freeze_backbone`), the head at
`head_lr`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.batchnorm import convert_split_bn
from sslpipe.pretrained import load_pretrained
from sslpipe import distributed
from sslpipe.config import build
from sslpipe.data.epochs import EpochLoader
from sslpipe.data.split import Split
from sslpipe.distributed import rank, world_size
from sslpipe.engine import Loop, LoopSettings, LrScale
from sslpipe.results import print_table
from sslpipe.stages.build import build_backbone, build_splits, normalizer
from sslpipe.stages.context import Context, StageResult, protocol_params, stage_run

LOSSES = ("bce", "dice")


def spatial_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) from `backbone.forward_features`: CNN maps as they are; ViT tokens
    (B, prefix + h*w, C) lose their prefix (class / register) tokens and fold into the grid."""
    out = backbone.forward_features(x)
    if out.ndim == 3:
        tokens = out[:, getattr(backbone, "num_prefix_tokens", 0):]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"forward_features gave {tokens.shape[1]} patch tokens, not a square grid")
        out = tokens.transpose(1, 2).reshape(len(x), -1, side, side)
    if out.ndim != 4:
        raise ValueError(f"forward_features gave shape {tuple(out.shape)}; stage=segment needs (B, C, h, w) maps")
    return out


class Segmenter(nn.Module):
    """backbone -> (B, C, h, w) -> conv3x3-BN-ReLU -> conv1x1 -> bilinear to (H, W): (B, H, W) logits."""

    def __init__(self, backbone: nn.Module, channels: int, hidden: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                                  nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(spatial_features(self.backbone, x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice (Milletari et al. 2016, V-Net) per image, averaged; `eps` smooths empty masks."""
    p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def seg_loss(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    return dice_loss(logits, target)


def iou_f1(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Foreground IoU = TP / (TP + FP + FN) and F1 (Dice) = 2 TP / (2 TP + FP + FN), pooled
    over every pixel of the split (so large and small objects weigh by their area)."""
    pred, target = pred.bool(), target.bool()
    tp = (pred & target).sum().item()
    fp = (pred & ~target).sum().item()
    fn = (~pred & target).sum().item()
    return tp / max(tp + fp + fn, 1), 2 * tp / max(2 * tp + fp + fn, 1)


@torch.no_grad()
def predict_masks(model: nn.Module, split: Split, normalize, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, H, W) predicted masks (sigmoid > 0.5)."""
    model.eval()
    return torch.cat([(model(normalize(split.images[i:i + batch_size].to(device))) > 0).to(torch.uint8).cpu()
                      for i in range(0, len(split), batch_size)])


def sample_plot(split: Split, pred: torch.Tensor, path, title: str, n: int = 8):
    """n test images with their true and predicted masks, one column each."""
    from sslpipe.plots import pyplot, save_figure

    plt = pyplot()
    n = min(n, len(split))
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), squeeze=False)
    for i in range(n):
        image = split.images[i].permute(1, 2, 0).numpy()
        rows = [(image.squeeze(-1) if image.shape[-1] == 1 else image, "image"), (split.masks[i].numpy(), "true"),
                (pred[i].numpy(), "predicted")]
        for r, (data, label) in enumerate(rows):
            axes[r, i].imshow(data, cmap="gray" if data.ndim == 2 else None, vmin=0, vmax=255 if r == 0 else 1)
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
            if i == 0:
                axes[r, i].set_ylabel(label)
    fig.suptitle(title)
    return save_figure(fig, path)


def _require_masks(splits, dataset: str) -> None:
    missing = [name for name in ("train", "test") if getattr(splits, name).masks is None]
    if missing:
        raise ValueError(f"stage=segment needs segmentation masks, but dataset={dataset} has none in its "
                         f"{' and '.join(missing)} split; use a data set with masks (shapes, pets)")


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.settings
    if st.loss not in LOSSES:
        raise ValueError(f"stage.segment.loss='{st.loss}' is not a segmentation loss; valid: {', '.join(LOSSES)}")
    # ------------------------------------------------------------ data
    splits = build_splits(ctx, labelled=True)
    _require_masks(splits, cfg.dataset.name)
    masks = splits.train.masks.to(ctx.device)
    # the loader hands out indices as "labels", so that each batch finds its masks
    indexed = Split(splits.train.images, torch.arange(len(splits.train)))
    loader = EpochLoader(indexed, st.batch_size, shuffle=True, drop_last=len(indexed) > st.batch_size,
                         seed=cfg.seed, rank=rank(), world_size=world_size())
    norm = normalizer(ctx).to(ctx.device)
    # ------------------------------------------------------------ model
    backbone = build_backbone(ctx)
    source = load_pretrained(backbone, cfg.pretrained, "segment", cfg.tracking.uri)
    with torch.no_grad():
        probe = torch.zeros(1, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
        channels = spatial_features(backbone.eval(), probe).shape[1]
    model = convert_split_bn(Segmenter(backbone, channels, st.hidden), st.split_bn).to(ctx.device)
    if st.freeze_backbone:
        model.backbone.requires_grad_(False)
    lr_scale = LrScale.of_run(st.lr_scaling, st.batch_size, st.loop.grad_accum)  # rates are per 256 images
    groups = [{"params": list(model.head.parameters()), "lr": lr_scale(st.head_lr)}]
    if not st.freeze_backbone:
        groups.insert(0, {"params": list(model.backbone.parameters()), "lr": lr_scale(st.backbone_lr)})
    optimizer = build(st.optimizer)(groups)
    trained = distributed.wrap(model, ctx.device)  # DDP when distributed: one model, gradients averaged

    def step(images: torch.Tensor, index: torch.Tensor, progress: float) -> torch.Tensor:
        x, y = norm(images), masks[index].float()
        if st.hflip > 0:  # the same flip for image and mask
            flip = torch.rand(len(x), device=x.device) < st.hflip
            x, y = torch.where(flip[:, None, None, None], x.flip(-1), x), torch.where(flip[:, None, None], y.flip(-1), y)
        if st.freeze_backbone:
            model.backbone.eval()  # frozen means its BatchNorm statistics too
        return seg_loss(st.loss, trained(x), y)

    # ------------------------------------------------------------ fit
    settings = LoopSettings.of_stage(st)
    loop = Loop(model, step, optimizer, loader, settings, ctx.device, ctx.run_dir / "checkpoints" / "last.pt", seed=cfg.seed,
                should_stop=ctx.should_stop)
    loop.resume()
    with stage_run(ctx, run_id=loop.state.extra.get("run_id")) as run:
        loop.state.extra["run_id"] = run.id
        run.log_params({**protocol_params(ctx, epochs=st.loop.epochs, max_steps=st.loop.max_steps, loss=st.loss,
                                          backbone_lr=st.backbone_lr, head_lr=st.head_lr,
                                          freeze_backbone=st.freeze_backbone),
                        **lr_scale.params(backbone_lr=st.backbone_lr, head_lr=st.head_lr), "pretrained.source": source})
        loop.run(run.log_metrics)
        run.set_tags(loop.agreement_tags())
        # ------------------------------------------------------------ evaluate and log
        metrics: dict[str, float] = {}
        for name in ("val", "test"):
            split = getattr(splits, name)
            if split is None or split.masks is None:
                continue
            pred = predict_masks(model, split, norm, ctx.device)
            metrics[f"{name}/iou"], metrics[f"{name}/f1"] = iou_f1(pred, split.masks)
            if name == "test":
                ctx.run_dir.mkdir(parents=True, exist_ok=True)
                title = f"segment ({cfg.pretrained}): test IoU {metrics['test/iou']:.3f}"
                run.log_artifact(sample_plot(split, pred, ctx.run_dir / "segment_samples.png", title), "plots")
        run.log_metrics(metrics, step=0)
    print_table(f"segment ({st.loss}) from {cfg.pretrained}",
                f"test/iou {metrics['test/iou']:.4f}  test/f1 {metrics['test/f1']:.4f}")
    return StageResult(metrics=metrics, checkpoint=str(loop.path), run_id=run.id)
