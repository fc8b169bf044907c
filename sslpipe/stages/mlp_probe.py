"""stage=mlp_probe: a non-linear probe, an MLP with hidden sizes [512, 256] (non-linear
probing as in iBOT's and MAE's evaluations), on frozen features extracted once and cached
(the skeleton and fit loop shared with the other probes: sslpipe.stages.probe)."""

from __future__ import annotations

import torch
from torch import nn

from sslpipe.stages.context import Context, StageResult
from sslpipe.stages.probe import Fitted, fit_head, head_lr_scale, run_probe


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
    """The head (initialised from `seed`) fitted by `fit_head`; returned in eval mode."""
    torch.manual_seed(seed)
    head = MLPHead(features.shape[1], list(hidden), num_classes, dropout, features.mean(0),
                   features.std(0).clamp_min(1e-6))
    return fit_head(head, features, labels, epochs, batch_size, lr, weight_decay, seed, min_batch=2)


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.settings
    lr_scale = head_lr_scale(st)

    def fit(features: torch.Tensor, labels: torch.Tensor) -> Fitted:
        head = fit_mlp(features, labels, cfg.dataset.num_classes, list(st.hidden), st.dropout, st.epochs,
                       st.batch_size, lr_scale(st.lr), st.weight_decay, cfg.seed)
        path = ctx.run_dir / "mlp_head.pt"
        torch.save(head.state_dict(), path)
        return Fitted(lambda x: head(x).argmax(1), head=path)

    return run_probe(ctx, dict(hidden=list(st.hidden), epochs=st.epochs, lr=st.lr, weight_decay=st.weight_decay,
                               dropout=st.dropout), fit, f"mlp probe {list(st.hidden)}", lr_scale=lr_scale)
