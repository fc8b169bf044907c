"""stage=linear_probe: a linear classifier on frozen features, extracted once and cached.
Not wrapped in DDP: every rank gets the whole split's features (gathered) and fits the same
head from the same seed, so the ranks already agree and there is nothing to average."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.checkpoint import load_pretrained
from sslpipe.export import write_tensors
from sslpipe.stages import (Context, StageResult, build_backbone, build_splits, extract_features, log_classification,
                            normalizer, print_table, protocol_params, stage_run)


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, batch_size: int, lr: float,
               weight_decay: float, seed: int) -> nn.Linear:
    """Logistic regression on standardised features with AdamW + cosine schedule. The
    standardisation is folded into the returned layer, so it applies to raw features."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(x) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(head(x[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():  # W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m)
        head.weight.div_(std)
        head.bias.sub_(head.weight @ mean)
    return head


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.cfg.stage
    splits = build_splits(ctx, labelled=True)
    backbone = build_backbone(ctx)
    source = load_pretrained(backbone, cfg.pretrained, "linear_probe", cfg.tracking.uri)
    with stage_run(ctx) as run:
        run.log_params({**protocol_params(ctx, epochs=st.epochs, lr=st.lr, weight_decay=st.weight_decay),
                        "pretrained.source": source})
        norm = normalizer(ctx)
        feats = {name: extract_features(backbone, split, norm, ctx.device, 512)
                 for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)) if split is not None}
        head = fit_linear(feats["train"], splits.train.labels, cfg.dataset.num_classes, st.epochs, st.batch_size, st.lr,
                          st.weight_decay, cfg.seed)
        with torch.no_grad():
            predictions = {name: (split.labels, head(feats[name]).argmax(1))
                           for name, split in (("val", splits.val), ("test", splits.test)) if split is not None}
        metrics = log_classification(run, ctx, predictions, splits.classes)
        head_path = ctx.run_dir / "linear_head.safetensors"
        write_tensors({"weight": head.weight, "bias": head.bias}, head_path)
        run.log_artifact(head_path, "checkpoints")
    print_table(f"linear probe from {cfg.pretrained}", f"test/top1 {metrics['test/top1']:.4f}")
    return StageResult(metrics=metrics, outputs={"linear_head": str(head_path)}, run_id=run.id)
