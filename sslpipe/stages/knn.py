"""stage=knn: weighted cosine kNN on frozen features (Wu et al. 2018; DINO's eval_knn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict

from sslpipe.stages.context import Context, StageResult
from sslpipe.stages.probe import Fitted, run_probe


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
    cfg, st = ctx.cfg, ctx.settings

    def fit(features: torch.Tensor, labels: torch.Tensor) -> Fitted:  # kNN keeps the train features
        return Fitted(lambda query: knn_classify(features, labels, query, cfg.dataset.num_classes, st.k, st.temperature))

    return run_probe(ctx, dict(k=st.k, temperature=st.temperature), fit, f"knn (k={st.k}, T={st.temperature})",
                     feature_batch=st.batch_size)
