"""SIMO2 (after the SIMO2 reference code, JAX / Flax NNX): class-balanced batches,
L2-normalised embeddings, and a loss that pulls same-class embeddings together while pushing
class means and different-class embeddings towards orthogonality. Written by hand: no library
has it.

It USES LABELS: a supervised (or pseudo-labelled) pretraining objective, not a
self-supervised one, and needs the class-balanced sampler (`sslpipe.data.samplers`).

Under DDP each rank draws its own class-balanced batch and the loss, a sum over pairs, is
taken within it: N ranks train on N independent batches of stage.pretrain.batch_size, not on one
batch N times larger, so a 2-rank run and a 1-rank run at the same global batch differ
from the first step (tests/test_equivalence.py asserts that difference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pair_loss(embeddings: torch.Tensor, target: float, epsilon: float) -> torch.Tensor:
    """The SIMO2 reference code's `combined_loss` over every pair i < j of the rows of `embeddings`
    (..., M, D), summed: with r = (e_i . e_j)^2 / (epsilon + |e_i - e_j|^2), each pair costs
    (1 + r)^(1 - 2 target). target 1 (similar) rewards large r: close, aligned pairs;
    target ~0 (dissimilar) rewards r -> 0: orthogonal pairs. Leading dims are summed too."""
    i, j = torch.triu_indices(embeddings.shape[-2], embeddings.shape[-2], offset=1, device=embeddings.device)
    e1, e2 = embeddings[..., i, :], embeddings[..., j, :]
    dot2 = (e1 * e2).sum(-1) ** 2
    dist2 = ((e1 - e2) ** 2).sum(-1)
    return torch.exp((1 - 2 * target) * torch.log1p(dot2 / (epsilon + dist2))).sum()


def simo2_loss(z: torch.Tensor, orth_lean: float, epsilon: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """z (C, k, D): k L2-normalised embeddings of each of C classes. Returns the sum of
    same-class loss (pairs within a class, target 1), class-mean loss (pairs of the C class
    means, target orth_lean) and different-class loss (for each of the k slots, pairs across
    classes, target orth_lean), and the three parts (the SIMO2 reference code's `simo2_loss_fn`)."""
    same = pair_loss(z, 1.0, epsilon)
    means = pair_loss(z.mean(dim=1), orth_lean, epsilon)
    diff = pair_loss(z.transpose(0, 1), orth_lean, epsilon)
    return same + means + diff, {"same": same, "means": means, "diff": diff}


def group_by_class(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, D) embeddings + (B,) labels of a class-balanced batch -> (C, k, D)."""
    classes, counts = torch.unique(labels, return_counts=True)
    if len(classes) < 2 or bool((counts != counts[0]).any()) or bool((classes < 0).any()):
        raise ValueError(f"simo2 needs class-balanced batches of >= 2 labelled classes with equal counts; got classes "
                         f"{classes.tolist()} with counts {counts.tolist()} (stage=pretrain draws them for simo2)")
    order = torch.argsort(labels, stable=True)
    return z[order].view(len(classes), int(counts[0]), z.shape[-1])


class SIMO2(nn.Module):
    """Backbone + one linear layer to `embedding_size`, L2-normalised; SIMO2 loss on a batch of
    `classes x samples_per_class` images (the SIMO2 reference code's defaults: embedding 16, 32 per
    class, orth_lean 1/137, epsilon 1/137 in the pair ratio). One augmented view per image, as there.

    Shapes: view (C k, C_in, H, W) + labels (C k,) -> embeddings (C, k, embedding_size) -> scalar.
    """

    global_views, local_views, needs_labels, class_balanced = 1, 0, True, True
    objective = "simo2"

    def __init__(self, backbone: nn.Module, embedding_size: int = 16, samples_per_class: int = 32,
                 orth_lean: float = 1 / 137, epsilon: float = 1 / 137):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Linear(backbone.num_features, embedding_size)
        self.samples_per_class = samples_per_class
        self.orth_lean, self.epsilon = orth_lean, epsilon

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        z = F.normalize(self.projector(self.backbone(views[0])), dim=1)
        loss, _ = simo2_loss(group_by_class(z, labels), self.orth_lean, self.epsilon)
        return loss

    def after_step(self, progress: float) -> None:
        pass
