"""stage=finetune: backbone + linear head trained end to end, with separate backbone and
head learning rates (1e-4 / 1e-3 for an iBOT-style ViT-S/4 on CIFAR-10: 68.73 % test top-1)
and, optionally, layer-wise learning-rate decay over the backbone's depth
(BEiT, Bao et al. 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe import distributed
from sslpipe.batchnorm import convert_split_bn
from sslpipe.pretrained import load_pretrained
from sslpipe.config import build
from sslpipe.data.loaders import eval_loader, is_streamed, ops_in_workers, training_loader
from sslpipe.data.stream import CropSpec
from sslpipe.data.views import Augment, AugmentSpec, base_spec, override_spec
from sslpipe.distributed import rank, world_size
from sslpipe.engine import Loop, LoopSettings, LrScale
from sslpipe.progress import Progress
from sslpipe.results import print_table
from sslpipe.stages.build import build_backbone, build_splits, normalizer
from sslpipe.stages.context import Context, StageResult, log_classification, protocol_params, stage_run


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def layer_ids(backbone: nn.Module) -> dict[str, int]:
    """Depth index (0 = input side) of each backbone parameter: timm's own grouping where the
    model has a `group_matcher` (stem, then each block), else one layer per top-level child,
    numbered children of a Sequential / ModuleList counting one each (`features.0`, `features.1`)."""
    if hasattr(backbone, "group_matcher"):
        from timm.models import group_parameters

        ids = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
        top = max(ids.values(), default=0)
        return {name: ids.get(name, top) for name, _ in backbone.named_parameters()}
    keys: dict[str, int] = {}
    out = {}
    for name, _ in backbone.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        out[name] = keys.setdefault(key, len(keys))
    return out


def param_groups(model: Classifier | nn.Module, backbone_lr: float, head_lr: float,
                 layer_decay: float | None) -> list[dict]:
    """Optimizer groups: the head at `head_lr`; the backbone at `backbone_lr`, or with
    `layer_decay` d, its layer i of L at backbone_lr * d ** (L - 1 - i), so the last layer
    keeps backbone_lr and the stem learns slowest."""
    if layer_decay is None:
        return [{"params": list(model.backbone.parameters()), "lr": backbone_lr},
                {"params": list(model.head.parameters()), "lr": head_lr}]
    if not 0 < layer_decay <= 1:
        raise ValueError(f"stage.finetune.layer_decay={layer_decay} must be null or in (0, 1]")
    ids = layer_ids(model.backbone)
    depth = max(ids.values(), default=0) + 1
    groups: dict[int, list] = {}
    for name, param in model.backbone.named_parameters():
        groups.setdefault(ids[name], []).append(param)
    return [*({"params": ps, "lr": backbone_lr * layer_decay ** (depth - 1 - i), "layer": i}
              for i, ps in sorted(groups.items())),
            {"params": list(model.head.parameters()), "lr": head_lr}]


def finetune_spec(augment: Mapping, crop_min: float, view: Mapping | None) -> AugmentSpec:
    """Fine-tuning's view: the data set's own (`dataset.augment`) cropped at scale >= `crop_min`,
    then the ops `stage.finetune.view` sets. A data set's view serves pretraining, whose views are
    meant to be hard; a fine-tune may want fewer ops (Fashion-MNIST, 5 epochs of the width-48
    SimCLR encoder: 0.8994 with jitter and rotation, 0.9146 with `view={jitter_prob: 0,
    rotation: 0}`, README "The goal's budget")."""
    return override_spec(replace(base_spec(augment), crop_scale=(crop_min, 1.0)), view, "stage.finetune.view")


@torch.no_grad()
def predict(model: nn.Module, split, normalize, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalize(x.to(device))).argmax(1).cpu() for x, _ in eval_loader(split, batch_size)])


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.settings
    # ------------------------------------------------------------ data
    splits = build_splits(ctx, labelled=True)
    norm = normalizer(ctx).to(ctx.device)
    spec = finetune_spec(cfg.dataset.augment, st.crop_min, st.get("view"))
    streamed, in_workers = is_streamed(splits.train), ops_in_workers(splits.train, ctx.device)
    # streamed: the crop is cut from the original image in the loader's workers (without augment: the
    # centre square), and on the CPU the other view ops too (sslpipe.data.loaders.ops_in_workers)
    augment = Augment(cfg.dataset.image_size, spec, list(cfg.dataset.norm.mean), list(cfg.dataset.norm.std),
                      crop=not streamed, view_ops=not in_workers).to(ctx.device)
    crops = [CropSpec(1, cfg.dataset.image_size, spec.crop_scale, tuple(spec.crop_ratio), spec if in_workers else None)
             if st.augment else CropSpec(1, cfg.dataset.image_size, (1.0, 1.0), (1.0, 1.0))]
    loader = training_loader(splits.train, st.batch_size, crops, seed=cfg.seed, rank=rank(), world_size=world_size(),
                             drop_last=len(splits.train) > st.batch_size, device=ctx.device)
    # ------------------------------------------------------------ model
    backbone = build_backbone(ctx)
    source = load_pretrained(backbone, cfg.pretrained, "finetune", cfg.tracking.uri)
    model = convert_split_bn(Classifier(backbone, cfg.dataset.num_classes), st.split_bn).to(ctx.device)
    lr_scale = LrScale.of_run(st.lr_scaling, st.batch_size, st.loop.grad_accum)  # rates are per 256 images
    optimizer = build(st.optimizer)(param_groups(model, lr_scale(st.backbone_lr), lr_scale(st.head_lr), st.layer_decay))
    trained = distributed.wrap(model, ctx.device)  # DDP when distributed: one model, gradients averaged

    def step(images: torch.Tensor | tuple, labels: torch.Tensor, progress: float) -> torch.Tensor:
        images = images[0] if isinstance(images, tuple) else images  # the stream loader's one crop
        x = augment(images) if st.augment else norm(images)
        return F.cross_entropy(trained(x), labels)

    # ------------------------------------------------------------ fit
    settings = LoopSettings.of_stage(st)
    progress = Progress("finetune", mode=None if rank() == 0 else "off")
    loop = Loop(model, step, optimizer, loader, settings, ctx.device, ctx.run_dir / "checkpoints" / "last.pt",
                progress=progress, seed=cfg.seed, should_stop=ctx.should_stop)
    loop.resume()
    with stage_run(ctx, run_id=loop.state.extra.get("run_id")) as run:
        loop.state.extra["run_id"] = run.id
        run.log_params({**protocol_params(ctx, epochs=st.loop.epochs, backbone_lr=st.backbone_lr, head_lr=st.head_lr,
                                        layer_decay=st.layer_decay),
                        **lr_scale.params(backbone_lr=st.backbone_lr, head_lr=st.head_lr), "pretrained.source": source})
        with progress:  # ends the terminal line even when training fails
            loop.run(run.log_metrics)
        run.set_tags(loop.agreement_tags())
        # ------------------------------------------------------------ evaluate
        predictions = {name: (split.labels, predict(model, split, norm, ctx.device))
                       for name, split in (("val", splits.val), ("test", splits.test)) if split is not None}
        metrics = log_classification(run, ctx, predictions, splits.classes)
    print_table(f"fine-tune from {cfg.pretrained}", f"test/top1 {metrics['test/top1']:.4f}")
    return StageResult(metrics=metrics, checkpoint=str(loop.path), run_id=run.id)
