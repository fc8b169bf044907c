"""stage=mlp_probe: a non-linear probe, an MLP with hidden sizes [512, 256] (seed 003's
"non-linear probing"), on frozen features extracted once and cached.
Not wrapped in DDP: every rank gets the whole split's features (gathered) and fits the same
head from the same seed, so the ranks already agree and there is nothing to average."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.checkpoint import load_pretrained
from sslpipe.stages import (Context, StageResult, build_backbone, build_splits, extract_features, log_classification,
                            normalizer, print_table, protocol_params, stage_run)


class MLPHead(nn.Module):
    """Standardise (train-set mean / std, stored as buffers) -> [Linear -> BN -> ReLU -> Dropout]
    per hidden size -> Linear: (B, in_features) -> (B, num_classes) logits."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float,
                 mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        layers: list[nn.Module] = []
        for width_in, width in zip([in_features, *hidden[:-1]], hidden):
            layers += [nn.Linear(width_in, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden[-1] if hidden else in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def fit_mlp(features: torch.Tensor, labels: torch.Tensor, num_classes: int, hidden: list[int], dropout: float,
            epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int) -> MLPHead:
    """AdamW + cosine schedule on cached features; returns the head in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    head = MLPHead(features.shape[1], list(hidden), num_classes, dropout, features.mean(0),
                   features.std(0).clamp_min(1e-6))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(features) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    head.train()
    for _ in range(epochs):
        for index in torch.randperm(len(features), generator=g).split(batch_size):
            if len(index) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.cfg.stage
    splits = build_splits(ctx, labelled=True)
    backbone = build_backbone(ctx)
    source = load_pretrained(backbone, cfg.pretrained, "mlp_probe", cfg.tracking.uri)
    with stage_run(ctx) as run:
        run.log_params({**protocol_params(ctx, hidden=list(st.hidden), epochs=st.epochs, lr=st.lr,
                                          weight_decay=st.weight_decay, dropout=st.dropout), "pretrained.source": source})
        norm = normalizer(ctx)
        feats = {name: extract_features(backbone, split, norm, ctx.device, 512)
                 for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)) if split is not None}
        head = fit_mlp(feats["train"], splits.train.labels, cfg.dataset.num_classes, list(st.hidden), st.dropout,
                       st.epochs, st.batch_size, st.lr, st.weight_decay, cfg.seed)
        with torch.no_grad():
            predictions = {name: (split.labels, head(feats[name]).argmax(1))
                           for name, split in (("val", splits.val), ("test", splits.test)) if split is not None}
        metrics = log_classification(run, ctx, predictions, splits.classes)
        head_path = ctx.run_dir / "mlp_head.pt"
        torch.save(head.state_dict(), head_path)
        run.log_artifact(head_path, "checkpoints")
    print_table(f"mlp probe {list(st.hidden)} from {cfg.pretrained}", f"test/top1 {metrics['test/top1']:.4f}")
    return StageResult(metrics=metrics, outputs={"mlp_head": str(head_path)}, run_id=run.id)
