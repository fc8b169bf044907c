"""sslpipe vs lightly's own example training loops (examples/pytorch/simclr.py, dino.py),
same method, backbone, batch size, optimizer and augmentations, in images/s.

The lightly side reproduces the example: torchvision resnet18 without its fc as the backbone,
lightly's transforms on PIL images through a DataLoader (the example's 8 workers, or fewer
where the machine has fewer cores), the example's heads, loss, optimizer and loop. Its
images are PIL images made from an in-memory uint8 array, as torchvision's CIFAR10 does (no
JPEG decoding, which would only slow that side). The sslpipe side is the real command,
`python -m sslpipe stage=pretrain ...` on the same images (dataset=npy) with the overrides
that make the recipe the same (printed below); its `train/images_per_s` is read back from
its MLflow store. Both: throughput over the steps after the first `--skip`.

    python benchmarks/peer.py --method simclr
    python benchmarks/peer.py --method dino --size 32 --local-size 13   # CIFAR-sized DINO (CPU)
    python benchmarks/peer.py --method dino --device cuda                # the example's 224/96 px
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_device, header, make_npy, sync, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class ArrayDataset:
    """(PIL image, label) pairs from a uint8 (N, H, W, 3) array, transformed: as CIFAR10 does."""

    def __init__(self, array, transform):
        self.array, self.transform = array, transform

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.array[i])), 0


# ------------------------------------------------------------------ lightly's examples
def lightly_simclr(array, device: str, steps: int, skip: int, workers: int, batch_size: int) -> float:
    import torch
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from torch import nn

    class SimCLR(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = SimCLRProjectionHead(512, 512, 128)

        def forward(self, x):
            x = self.backbone(x).flatten(start_dim=1)
            return self.projection_head(x)

    resnet = torchvision.models.resnet18()
    model = SimCLR(nn.Sequential(*list(resnet.children())[:-1])).to(device)
    transform = SimCLRTransform(input_size=array.shape[1])
    dataloader = torch.utils.data.DataLoader(ArrayDataset(array, transform), batch_size=batch_size, shuffle=True,
                                             drop_last=True, num_workers=workers)
    criterion = NTXentLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    done, t0 = 0, None
    while done < steps:
        for batch in dataloader:
            x0, x1 = batch[0]
            x0, x1 = x0.to(device), x1.to(device)
            loss = criterion(model(x0), model(x1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == skip:
                sync(device)
                t0 = time.perf_counter()
            if done == steps:
                break
    sync(device)
    return (steps - skip) * batch_size / (time.perf_counter() - t0)


def lightly_dino(array, device: str, steps: int, skip: int, workers: int, batch_size: int, local_size: int) -> float:
    import torch
    import torchvision
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform
    from lightly.utils.scheduler import cosine_schedule
    from torch import nn

    class DINO(nn.Module):
        def __init__(self, backbone, input_dim):
            super().__init__()
            self.student_backbone = backbone
            self.student_head = DINOProjectionHead(input_dim, 512, 64, 2048, freeze_last_layer=1)
            self.teacher_backbone = copy.deepcopy(backbone)
            self.teacher_head = DINOProjectionHead(input_dim, 512, 64, 2048)
            deactivate_requires_grad(self.teacher_backbone)
            deactivate_requires_grad(self.teacher_head)

        def forward(self, x):
            return self.student_head(self.student_backbone(x).flatten(start_dim=1))

        def forward_teacher(self, x):
            return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))

    resnet = torchvision.models.resnet18()
    model = DINO(nn.Sequential(*list(resnet.children())[:-1]), 512).to(device)
    transform = DINOTransform(global_crop_size=array.shape[1], local_crop_size=local_size)
    dataloader = torch.utils.data.DataLoader(ArrayDataset(array, transform), batch_size=batch_size, shuffle=True,
                                             drop_last=True, num_workers=workers)
    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    epochs, epoch, done, t0 = 10, 0, 0, None
    while done < steps:
        momentum_val = cosine_schedule(epoch, epochs, 0.996, 1)
        for batch in dataloader:
            views = batch[0]
            update_momentum(model.student_backbone, model.teacher_backbone, m=momentum_val)
            update_momentum(model.student_head, model.teacher_head, m=momentum_val)
            views = [view.to(device) for view in views]
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            student_out = [model.forward(view) for view in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
            loss.backward()
            model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == skip:
                sync(device)
                t0 = time.perf_counter()
            if done == steps:
                break
        epoch += 1
    sync(device)
    return (steps - skip) * batch_size / (time.perf_counter() - t0)


# ------------------------------------------------------------------ sslpipe, the same recipe
def sslpipe_overrides(method: str, size: int, batch_size: int, steps: int, device: str, root: Path) -> list[str]:
    common = [f"device={device}", "stage=pretrain", "dataset=npy", f"dataset.root={root}", f"dataset.image_size={size}",
              "backbone=resnet18", "backbone.cifar_stem=false",  # torchvision resnet18's stem, as the example
              f"stage.pretrain.batch_size={batch_size}", f"stage.pretrain.loop.max_steps={steps}", "stage.pretrain.loop.epochs=1000", "stage.pretrain.loop.log_every=1",
              "stage.pretrain.loop.warmup_epochs=0", "stage.pretrain.optimizer.weight_decay=0",
              "stage.pretrain.lr_scaling=none"]  # the peer's rate as given at this batch, not per 256 images
    if method == "simclr":  # SimCLRTransform's defaults; NTXentLoss() temperature 0.5; SGD lr 0.06
        return common + ["method=simclr", "method.proj_hidden_dim=512", "method.proj_output_dim=128",
                         "method.temperature=0.5", "stage.pretrain.optimizer._target_=torch.optim.SGD", "stage.pretrain.optimizer.lr=0.06",
                         "dataset.augment.fixed=[]"]  # SimCLR's views as method.views has them, blur included
    # DINOTransform's defaults are DINO's views as method.views has them (global crops 0.4-1, jitter
    # 0.4/0.4/0.2/0.1, blur 1/0.1/0.5, solarize 0/0.2); DINOProjectionHead(512, 512, 64, 2048); Adam
    # lr 1e-3; 6 local views
    return common + ["method=dino", "method.views.local_views=6", "method.proj_hidden_dim=512",
                     "method.bottleneck_dim=64", "method.output_dim=2048", "stage.pretrain.optimizer._target_=torch.optim.Adam",
                     "stage.pretrain.optimizer.lr=0.001", "dataset.augment.fixed=[]"]


def sslpipe_run(overrides: list[str], tmp: Path, skip: int, batch_size: int, round_: int) -> float:
    """One fresh run per round: its own run folder and store (a run folder that holds a final
    checkpoint would resume, train nothing and report the earlier round's numbers again)."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp}/mlflow-{round_}.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "SSLPIPE_PROGRESS": "log", "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run([sys.executable, "-m", "sslpipe", *overrides, f"tracking.artifact_root={tmp}/artifacts",
                          f"hydra.run.dir={tmp}/run-{round_}"], cwd=tmp, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sslpipe failed:\n{out.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=store)
    run = client.search_runs(client.get_experiment_by_name("sslpipe").experiment_id, order_by=["start_time DESC"])[0]
    history = sorted(client.get_metric_history(run.info.run_id, "train/images_per_s"), key=lambda m: m.step)
    window = [m.value for m in history if m.step > skip]
    return len(window) * batch_size / sum(batch_size / v for v in window)  # images over seconds in the window


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["simclr", "dino"], default="simclr")
    p.add_argument("--device", default=default_device())
    p.add_argument("--size", type=int, default=None, help="image / global crop size (simclr 32, dino 224)")
    p.add_argument("--local-size", type=int, default=None, help="DINO local crops (default size * 3 // 7: 96 of 224)")
    p.add_argument("--batch-size", type=int, default=None, help="the example's: simclr 256, dino 64")
    # A long window: lightly's DataLoader workers run up to 2 x prefetch_factor batches ahead
    # during the untimed first steps, so a short window (e.g. 5 steps) partly times batches
    # that were ready before it began and overstates lightly's steady state (measured: 448
    # images/s over steps 4-8, 380-400 over steps 6-20 and 11-30, same machine, same hour).
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=10, help="steps before the timed window")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="the example's 8, or the cores")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    size = args.size or (32 if args.method == "simclr" else 224)
    local = args.local_size or size * 3 // 7
    bs = args.batch_size or (256 if args.method == "simclr" else 64)

    import numpy as np

    header(f"Peer: lightly's examples/pytorch/{args.method}.py loop vs sslpipe, same recipe", args.device)
    tmp = Path(tempfile.mkdtemp(prefix="sslpipe-bench-"))
    make_npy(tmp / "npy", bs * (args.steps + 1), size)
    array = np.load(tmp / "npy" / "train_images.npy")
    overrides = sslpipe_overrides(args.method, size, bs, args.steps, args.device, tmp / "npy")
    theirs, ours = [], []
    for round_ in range(args.rounds):
        if args.method == "simclr":
            theirs.append(lightly_simclr(array, args.device, args.steps, args.skip, args.workers, bs))
        else:
            theirs.append(lightly_dino(array, args.device, args.steps, args.skip, args.workers, bs, local))
        ours.append(sslpipe_run(overrides, tmp, args.skip, bs, round_))
    print(f"recipe: resnet18 (torchvision stem), {size} px" + (f", 2 global + 6 local {local} px views" if args.method == "dino" else ", 2 views")
          + f", batch {bs}; {args.steps} steps, timed after step {args.skip}; lightly DataLoader workers: {args.workers}\n")
    print(f"sslpipe command: `python -m sslpipe {' '.join(overrides)}`\n")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    table(["loop", "images/s", "ratio vs lightly"], [
        [f"lightly examples/pytorch/{args.method}.py (PIL transforms in DataLoader workers)", med(theirs), 1.0],
        [f"sslpipe stage=pretrain (batched on-device augmentation, {args.device})", med(ours), med(ours) / med(theirs)],
    ])
    if args.rounds > 1:  # the rounds alternate lightly / sslpipe; each round's own ratio shows the noise
        print("\nper round (lightly, sslpipe images/s, ratio): "
              + "; ".join(f"{t:.0f}, {o:.0f}, {o / t:.3f}" for t, o in zip(theirs, ours)))


if __name__ == "__main__":
    main()
