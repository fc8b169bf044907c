"""stage=linear_probe: a linear classifier on frozen features, extracted once and cached
(the skeleton and fit loop shared with the other probes: sslpipe.stages.probe)."""

from __future__ import annotations

import torch
from torch import nn

from sslpipe.export import write_tensors
from sslpipe.stages import Context, StageResult
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


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.cfg.stage
    lr_scale = head_lr_scale(st)

    def fit(features: torch.Tensor, labels: torch.Tensor) -> Fitted:
        head = fit_linear(features, labels, cfg.dataset.num_classes, st.epochs, st.batch_size, lr_scale(st.lr),
                          st.weight_decay, cfg.seed)
        path = ctx.run_dir / "linear_head.safetensors"
        write_tensors({"weight": head.weight, "bias": head.bias}, path)
        return Fitted(lambda x: head(x).argmax(1), {"linear_head": path})

    return run_probe(ctx, dict(epochs=st.epochs, lr=st.lr, weight_decay=st.weight_decay), fit, "linear probe",
                     lr_scale=lr_scale)
