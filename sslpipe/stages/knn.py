"""stage=knn: weighted cosine kNN on frozen features (Wu et al. 2018; DINO's eval_knn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict

from sslpipe.checkpoint import load_pretrained
from sslpipe.stages import (Context, StageResult, build_backbone, build_splits, extract_features, log_classification,
                            normalizer, print_table, protocol_params, stage_run)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
                 k: int, temperature: float, batch_size: int = 1024) -> torch.Tensor:
    """Predicted labels (M,) for query features (M, D) by votes of the k most cosine-similar
    train features (N, D), weighted exp(sim / T); queries in batches to bound memory."""
    bank = F.normalize(train_features, dim=1).t().contiguous()  # (D, N), lightly's layout
    k = min(k, bank.shape[1])
    preds = [knn_predict(F.normalize(q, dim=1), bank, train_labels, num_classes, k, temperature)[:, 0]
             for q in query.split(batch_size)]
    return torch.cat(preds)


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.cfg.stage
    splits = build_splits(ctx, labelled=True)
    backbone = build_backbone(ctx)
    source = load_pretrained(backbone, cfg.pretrained, "knn", cfg.tracking.uri)
    with stage_run(ctx) as run:
        run.log_params({**protocol_params(ctx, k=st.k, temperature=st.temperature), "pretrained.source": source})
        norm = normalizer(ctx)
        feats = {name: extract_features(backbone, split, norm, ctx.device, st.batch_size)
                 for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)) if split is not None}
        num_classes = cfg.dataset.num_classes
        predictions = {name: (split.labels, knn_classify(feats["train"], splits.train.labels, feats[name], num_classes,
                                                         st.k, st.temperature))
                       for name, split in (("val", splits.val), ("test", splits.test)) if split is not None}
        metrics = log_classification(run, ctx, predictions, splits.classes)
    print_table(f"knn (k={st.k}, T={st.temperature}) from {cfg.pretrained}", f"test/top1 {metrics['test/top1']:.4f}")
    return StageResult(metrics=metrics, run_id=run.id)
