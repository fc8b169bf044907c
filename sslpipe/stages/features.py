"""Encoder features of a split, extracted once and shared: a pipeline's knn / linear / mlp
probes and visualize read and encode the images one time per (weights, split)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Features of the last few (weights, split) pairs: a pipeline's knn / linear / mlp probes (and
# visualize) run on the same encoder and splits, and read and encode the images once.
_FEATURES: dict[tuple, torch.Tensor] = {}
_FEATURES_KEPT = 8


def _fingerprint(backbone: torch.nn.Module, split, normalize) -> tuple:
    """Identity of (weights, images, normalisation): a digest of every tensor, so the random-init
    baselines of two stages share features only if their weights are equal too."""
    import hashlib

    digest = hashlib.sha1()
    for t in [*backbone.state_dict().values(), normalize.mean, normalize.std]:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes() if t.numel() else b"")
    if hasattr(split, "images"):  # the pixels themselves (about 1 GB/s)
        digest.update(split.images.cpu().contiguous().numpy().tobytes())
    else:  # the files and how they are read
        digest.update(f"{split.paths.root}|{split.settings}".encode())
        digest.update(split.paths.data.tobytes())
        digest.update(split.paths.offsets.tobytes())
    digest.update(split.labels.cpu().numpy().tobytes())
    return digest.hexdigest(), len(split)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, split, normalize, device: torch.device, batch_size: int,
                     cache: bool = True) -> torch.Tensor:
    """Features of every image of `split` (its eval view), once, in eval mode: (N, num_features)
    on the CPU; reused while the weights and the split are the same (`cache=False`: weights
    that are still training, never reused). Under DDP each rank extracts its shard and all
    ranks get the whole split's features."""
    from sslpipe import distributed
    from sslpipe.data.loaders import eval_loader

    key = _fingerprint(backbone, split, normalize) if cache else None
    if key in _FEATURES:
        log.info("features of %d images reused (same weights and split)", len(split))
        return _FEATURES[key]
    backbone.eval().to(device)
    normalize = normalize.to(device)

    def extract(part) -> torch.Tensor:
        out = [backbone(normalize(x.to(device, non_blocking=True))).float() for x, _ in eval_loader(part, batch_size)]
        return torch.cat(out) if out else torch.empty(0, backbone.num_features, device=device)

    features = distributed.extract_features_sharded(extract, split).cpu()
    if not cache:
        return features
    while len(_FEATURES) >= _FEATURES_KEPT:
        _FEATURES.pop(next(iter(_FEATURES)))
    _FEATURES[key] = features
    return features
