"""What the probes on frozen features (knn, linear_probe, mlp_probe) share: one skeleton
from `pretrained=` to logged metrics, and one fit loop for the heads that train.

`run_probe` loads the encoder, extracts each split's features once (cached, sharded over
ranks and gathered), hands the train features to the probe's `fit`, classifies val and test
with what it returns, and logs the metrics and the probe's artefacts. A probe file is only its
`fit` and its settings.

Not wrapped in DDP: every rank gets the whole split's features (gathered) and fits the same
head from the same seed, so the ranks already agree and there is nothing to average. A
head's batch is therefore global, and its learning rate is per 256 images of it (LrScale)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.pretrained import load_pretrained
from sslpipe.engine import LrScale
from sslpipe.results import print_table
from sslpipe.stages.build import build_backbone, build_splits, normalizer
from sslpipe.stages.context import Context, StageResult, log_classification, protocol_params, stage_run
from sslpipe.stages.features import extract_features


@dataclass
class Fitted:
    """A probe fitted on train features: `classify` maps features (M, D) to labels (M,);
    `head` is the trained head's tensor file (linear and MLP probes), logged and returned."""

    classify: Callable[[torch.Tensor], torch.Tensor]
    head: Path | None = None


def fit_head(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int, lr: float,
             weight_decay: float, seed: int, min_batch: int = 1) -> nn.Module:
    """Cross-entropy on cached features: AdamW + cosine schedule over shuffled mini-batches
    (drawn from `seed` alone); batches smaller than `min_batch` are skipped (BatchNorm needs 2).
    Returns the head in eval mode."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(features) // batch_size))
    head.train()
    for _ in range(epochs):
        for index in torch.randperm(len(features), generator=g).split(batch_size):
            if len(index) < min_batch:
                continue
            loss = F.cross_entropy(head(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


def head_lr_scale(st) -> LrScale:
    """A trained head's rate: the stage's `lr` per 256 images, scaled to its (global) batch."""
    return LrScale(st.lr_scaling, st.batch_size)


def run_probe(ctx: Context, params: dict, fit: Callable[[torch.Tensor, torch.Tensor], Fitted], title: str,
              feature_batch: int = 512, lr_scale: LrScale | None = None,
              fit_images: Callable[[nn.Module, object, nn.Module], Fitted] | None = None) -> StageResult:
    """Evaluate `pretrained=` with the probe that `fit(train_features, train_labels)` builds;
    `params` are its protocol settings (logged as `protocol.<name>`); a head that trains passes
    its `lr_scale`, logged as the global batch and effective rate. A probe that trains on fresh
    views of the train images instead (the published linear protocol) passes
    `fit_images(backbone, train_split, normalize)`: no train features are cached then."""
    cfg = ctx.cfg
    splits = build_splits(ctx, labelled=True)
    backbone = build_backbone(ctx)
    source = load_pretrained(backbone, cfg.pretrained, cfg.stage.name, cfg.tracking.uri)
    with stage_run(ctx) as run:
        run.log_params({**protocol_params(ctx, **params), "pretrained.source": source,
                        **(lr_scale.params(lr=params.get("lr", ctx.settings.get("lr"))) if lr_scale else {})})
        norm = normalizer(ctx)
        named = [("train", splits.train)] if fit_images is None else []
        feats = {name: extract_features(backbone, split, norm, ctx.device, feature_batch)
                 for name, split in (*named, ("val", splits.val), ("test", splits.test)) if split is not None}
        ctx.run_dir.mkdir(parents=True, exist_ok=True)  # where the probe writes its head
        fitted = (fit(feats["train"], splits.train.labels) if fit_images is None
                  else fit_images(backbone, splits.train, norm.to(ctx.device)))
        with torch.no_grad():
            predictions = {name: (split.labels, fitted.classify(feats[name]))
                           for name, split in (("val", splits.val), ("test", splits.test)) if split is not None}
        metrics = log_classification(run, ctx, predictions, splits.classes)
        if fitted.head is not None:
            run.log_artifact(fitted.head, "checkpoints")
    print_table(f"{title} from {cfg.pretrained}", f"test/top1 {metrics['test/top1']:.4f}")
    return StageResult(metrics=metrics, head=str(fitted.head) if fitted.head else None, run_id=run.id)
