"""Reuse an sslpipe export downstream (as spiral-selfsup's fine_tune_with_selfsup example does):
load manifest.json and the encoder, then train two linear heads on the frozen features for the
same small budget, one starting from the exported linear probe and one from scratch, and print
both accuracies.

    python examples/downstream.py outputs/runs/<date>/<time>_pipeline_simclr/export [--steps 20] [overrides]

The data set is the one the manifest names, built by sslpipe's own reader (so a digits or
shapes export needs nothing else); the optimizer follows the manifest's recommended settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def load_encoder(export: Path, manifest: dict) -> nn.Module:
    """The plain backbone, rebuilt from the manifest and filled strictly from encoder.*."""
    from hydra.utils import instantiate

    from sslpipe.tensorfiles import read_tensors

    build = {k: v for k, v in manifest["backbone"]["build"].items() if k != "name"}
    encoder = instantiate(build)
    encoder.load_state_dict(read_tensors(export / manifest["files"]["encoder"]["path"]), strict=True)
    return encoder.eval()


def load_head(export: Path, manifest: dict, num_features: int, num_classes: int) -> nn.Linear | None:
    if "linear_head" not in manifest["files"]:
        return None
    from sslpipe.tensorfiles import read_tensors

    head = nn.Linear(num_features, num_classes)
    head.load_state_dict(read_tensors(export / manifest["files"]["linear_head"]["path"]), strict=True)
    return head


@torch.no_grad()
def features(encoder: nn.Module, images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    x = images.float() / 255.0
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return torch.cat([encoder(b) for b in x.split(512)])


def accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def train(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, lr: float,
          weight_decay: float, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        index = torch.randint(len(x), (min(batch_size, len(x)),), generator=g)
        loss = F.cross_entropy(head(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an export folder (manifest.json + encoder + linear_head)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps for each head (the same for both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="overrides of the data set as in the run, e.g. "
                        "dataset.source.test_size=240 (the manifest names the data set, not its settings)")
    args = parser.parse_intermixed_args()

    from sslpipe.config import build, compose

    manifest = json.loads((args.export / "manifest.json").read_text())
    rec, num_classes = manifest["recommended"], manifest["downstream"]["num_classes"]
    encoder = load_encoder(args.export, manifest)
    probe = load_head(args.export, manifest, manifest["backbone"]["num_features"], num_classes)
    if probe is None:
        raise SystemExit(f"{args.export} has no linear_head; export after a linear_probe step (stage=pipeline does)")

    splits = build(compose([f"dataset={manifest['dataset']['name']}", *args.overrides]).dataset.source)
    norm = manifest["backbone"]["normalization"]
    x_train, x_test = (features(encoder, s.images, norm["mean"], norm["std"]) for s in (splits.train, splits.test))
    y_train, y_test = splits.train.labels, splits.test.labels

    torch.manual_seed(args.seed)
    scratch = nn.Linear(x_train.shape[1], num_classes)
    print(f"export {args.export} ({manifest['variant']}, {manifest['objective']}); {manifest['dataset']['name']}: "
          f"{len(y_train)} train / {len(y_test)} test")
    print(f"before training: exported probe top1 {accuracy(probe, x_test, y_test):.4f}, "
          f"scratch head top1 {accuracy(scratch, x_test, y_test):.4f}")
    for head in (probe, scratch):
        train(head, x_train, y_train, args.steps, rec["batch_size"], rec["learning_rate"], rec["weight_decay"], args.seed)
    print(f"after {args.steps} steps (AdamW lr {rec['learning_rate']}, batch {rec['batch_size']}): "
          f"exported probe top1 {accuracy(probe, x_test, y_test):.4f}, scratch head top1 {accuracy(scratch, x_test, y_test):.4f}")


if __name__ == "__main__":
    main()
