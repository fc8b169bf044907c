"""stage=finetune: backbone + linear head trained end to end, with separate backbone and
head learning rates (seed 003: 1e-4 / 1e-3 for ViT-S/4 on CIFAR-10)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.checkpoint import load_pretrained
from sslpipe.config import build
from sslpipe.data import EpochLoader
from sslpipe.data.views import Augment, AugmentSpec
from sslpipe.distributed import rank, world_size
from sslpipe.engine import Loop, LoopSettings
from sslpipe.progress import Progress
from sslpipe.stages import (Context, StageResult, build_backbone, build_splits, log_classification, normalizer,
                            print_table, protocol_params, stage_run)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def predict(model: nn.Module, split, normalize, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalize(x.to(device))).argmax(1).cpu()
                      for x, _ in EpochLoader(split, batch_size, shuffle=False, drop_last=False)])


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.cfg.stage
    # ------------------------------------------------------------ data
    splits = build_splits(ctx, labelled=True)
    loader = EpochLoader(splits.train, st.batch_size, shuffle=True, drop_last=len(splits.train) > st.batch_size,
                         seed=cfg.seed, rank=rank(), world_size=world_size())
    norm = normalizer(ctx).to(ctx.device)
    spec = AugmentSpec(**{**cfg.dataset.augment, "crop_scale": (st.crop_min, 1.0)})
    augment = Augment(cfg.dataset.image_size, spec, list(cfg.dataset.norm.mean), list(cfg.dataset.norm.std)).to(ctx.device)
    # ------------------------------------------------------------ model
    backbone = build_backbone(ctx)
    source = load_pretrained(backbone, cfg.pretrained, "finetune", cfg.tracking.uri)
    model = Classifier(backbone, cfg.dataset.num_classes).to(ctx.device)
    optimizer = build(st.optimizer)([{"params": model.backbone.parameters(), "lr": st.backbone_lr},
                                     {"params": model.head.parameters(), "lr": st.head_lr}])

    def step(images: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        x = augment(images) if st.augment else norm(images)
        return F.cross_entropy(model(x), labels)

    # ------------------------------------------------------------ fit
    settings = LoopSettings(epochs=st.epochs, max_steps=st.max_steps, grad_accum=st.grad_accum,
                            warmup_epochs=st.warmup_epochs, min_lr_ratio=st.min_lr_ratio, amp=st.amp,
                            checkpoint_every=st.checkpoint_every, log_every=st.log_every)
    progress = Progress("finetune", mode=None if rank() == 0 else "off")
    loop = Loop(model, step, optimizer, loader, settings, ctx.device, ctx.run_dir / "checkpoints" / "last.pt",
                progress=progress)
    loop.resume()
    with stage_run(ctx, run_id=loop.state.extra.get("run_id")) as run:
        loop.state.extra["run_id"] = run.id
        run.log_params({**protocol_params(ctx, epochs=st.epochs, backbone_lr=st.backbone_lr, head_lr=st.head_lr),
                        "pretrained.source": source})
        loop.log_metrics = run.log_metrics
        with progress:  # ends the terminal line even when training fails
            loop.run()
        # ------------------------------------------------------------ evaluate
        predictions = {name: (split.labels, predict(model, split, norm, ctx.device))
                       for name, split in (("val", splits.val), ("test", splits.test)) if split is not None}
        metrics = log_classification(run, ctx, predictions, splits.classes)
    print_table(f"fine-tune from {cfg.pretrained}", f"test/top1 {metrics['test/top1']:.4f}")
    return StageResult(metrics=metrics, outputs={"checkpoint": str(loop.path)}, run_id=run.id)
