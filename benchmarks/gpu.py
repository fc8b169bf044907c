"""GPU pretraining speed end to end, from a JPEG folder on local disk (issue 15; issue 11's
GPU-decode path end to end): ResNet-50 SimCLR at 224 px (2 views) and ViT-S/16 DINO
(2 x 224 + 6 x 96 px), each as

- bare: a hand-written PyTorch loop over sslpipe's own model, loss and optimizer (bf16 autocast,
  channels_last for the CNN, fused optimizer) on views already on the GPU: no data, no
  augmentation, no logging. The model's own limit on this GPU. Beside it, `augmented` (the same
  loop making new views every step from a uint8 batch on the GPU with sslpipe's batched view
  ops) and `compiled` (backbone and projector through torch.compile, compile time reported).
- sslpipe: the real command, `python -m sslpipe stage=pretrain ... dataset=imagefolder`
  (MLflow on, checkpoints at their default interval, progress on, the online monitor off), once
  with `dataset.loader=gpu` (nvJPEG decode in the training process, views cut with roi_align)
  and once with `dataset.loader=stream` (decode and crops in DataLoader workers); images/s and
  data-wait share read back from its MLflow store (`train/images_per_s`, `train/data_wait`).
- lightly: lightly's own example loop for the method (examples/pytorch/simclr.py, dino.py: the
  example's transforms on PIL images in DataLoader workers, its loop, fp32 as the example), on
  the same JPEG folder through torchvision's ImageFolder, with the same backbone and heads.

Achieved TFLOP/s = model FLOPs per image (forward + backward, torch.utils.flop_counter on the
bare step: matrix products and convolutions) x images/s; share of the GPU's dense bf16 peak
(`--peak`, default 989 TFLOP/s: NVIDIA's H100 / H200 SXM data sheet). stable-pretraining is
not run: its wheel pulls wandb, pylance, datasets and minari, more than the 64 MiB a call to
the lent GPU machine can carry (it has no network).

    python benchmarks/gpu.py                               # on a CUDA machine, both workloads
    python benchmarks/gpu.py --device cpu --smoke          # every path at toy sizes (CI-free check)
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Training, header, make_npy, sync, table  # noqa: E402
from _imagenet_like import make_pool, make_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Both sides get the same recipe: the paper's heads, the lightly example's optimizer family.
WORKLOADS = {
    "simclr_r50": {
        "title": "ResNet-50 SimCLR, 2 x 224 px",
        "overrides": ["method=simclr", "backbone=resnet50", "backbone.cifar_stem=false",
                      "method.proj_hidden_dim=2048", "method.proj_output_dim=128", "method.temperature=0.5",
                      "stage.pretrain.optimizer._target_=torch.optim.SGD", "+stage.pretrain.optimizer.momentum=0.9",
                      "stage.pretrain.optimizer.lr=0.06"],
    },
    "dino_vits16": {
        "title": "ViT-S/16 DINO, 2 x 224 + 6 x 96 px",
        "overrides": ["method=dino", "backbone=vit_small", "backbone.patch_size=16", "method.views.local_views=6",
                      "method.proj_hidden_dim=2048", "method.bottleneck_dim=256", "method.output_dim=65536",
                      "method.batch_norm=false", "stage.pretrain.optimizer_from=method"],
    },
}


def common_overrides(name: str, size: int, batch: int, local: int) -> list[str]:
    local_size = [f"method.views.local_size={local}"] if name.startswith("dino") else []
    return ["stage=pretrain", f"dataset.image_size={size}", f"stage.pretrain.batch_size={batch}", *local_size,
            "stage.pretrain.loop.warmup_epochs=0", "stage.pretrain.lr_scaling=none", "stage.pretrain.monitor.every=0"]


# ------------------------------------------------------------------ bare loop
def bare(name: str, args, tmp: Path, compile: bool = False, augment: bool = False) -> dict:
    """sslpipe's model, loss and optimizer in a hand-written loop on fixed views on the device;
    with `compile`, backbone and projector through torch.compile (stage.pretrain.compile=true),
    the first step's time reported as the compile time; with `augment`, new views every step
    from a uint8 batch resident on the GPU (sslpipe's batched view ops, crop included): the
    bare loop plus the augmentation that sslpipe's step does, so the two gaps can be told apart."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    make_npy(tmp / "npy", 32, args.size)
    tr = Training([*WORKLOADS[name]["overrides"], *common_overrides(name, args.size, args.batch[name], args.local),
                   "dataset=npy", f"dataset.root={tmp / 'npy'}", f"device={args.device}",
                   f"stage.pretrain.compile={str(compile).lower()}"], args.device, tmp / "bare")
    dev, method = tr.device, tr.method
    images = torch.randint(0, 256, (args.batch[name], 3, args.size, args.size), dtype=torch.uint8, device=dev)
    labels = torch.zeros(args.batch[name], dtype=torch.long, device=dev)
    with torch.no_grad():
        views = tr.views(images)  # augmented once: the loop below reuses them
    amp = dev.type == "cuda"

    def step(progress: float) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = method.training_step(tr.views(images) if augment else views, labels, progress)
        loss.backward()
        if hasattr(method, "before_optimizer_step"):
            method.before_optimizer_step(progress)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        method.after_step(progress)

    t = time.perf_counter()
    if compile or augment:
        step(0.0)
        flops_per_image = None
    else:
        with FlopCounterMode(display=False) as counter:
            step(0.0)
        flops_per_image = counter.get_total_flops() / args.batch[name]
    sync(args.device)
    first_step_s = time.perf_counter() - t
    for _ in range(args.skip):
        step(0.1)
    syncs = "not checked (CPU)"
    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # a host-device sync inside the step raises here
        try:
            step(0.1)
            syncs = "none"
        except RuntimeError as e:
            syncs = f"yes: {str(e).splitlines()[0][:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.reset_peak_memory_stats()
    sync(args.device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step(0.1)
    sync(args.device)
    elapsed = time.perf_counter() - t
    out = {"images_s": args.steps * args.batch[name] / elapsed, "flops_per_image": flops_per_image, "syncs": syncs,
           "first_step_s": first_step_s, "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}
    if dev.type == "cuda" and args.profile and not (compile or augment):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(0.1)
            sync(args.device)
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:10]
        out["profile"] = [(e.key[:90], 100 * e.self_device_time_total / total, e.count // 3) for e in top]
    return out


# ------------------------------------------------------------------ lightly's example loops
def lightly_loop(name: str, args, root: Path) -> dict:
    import copy

    import timm
    import torch
    import torchvision
    from torch import nn

    dev, batch = torch.device(args.device), args.batch[name]
    if name == "simclr_r50":
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform

        backbone = timm.create_model("resnet50", num_classes=0)
        model = nn.ModuleDict({"backbone": backbone, "head": SimCLRProjectionHead(2048, 2048, 128)}).to(dev)
        transform = SimCLRTransform(input_size=args.size)
        criterion = NTXentLoss()  # temperature 0.5, the example's
        optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9)

        def step(views, epoch):
            x0, x1 = (v.to(dev) for v in views)
            return criterion(model["head"](model["backbone"](x0)), model["head"](model["backbone"](x1)))
    else:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.transforms.dino_transform import DINOTransform

        backbone = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=args.size, dynamic_img_size=True)
        student = nn.ModuleDict({"backbone": backbone, "head": DINOProjectionHead(384, 2048, 256, 65536,
                                                                                   freeze_last_layer=1)})
        # as the example: the teacher's backbone a deep copy, its head built anew (the head's
        # weight-normed last layer cannot be deep-copied)
        teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": DINOProjectionHead(384, 2048, 256, 65536)})
        deactivate_requires_grad(teacher)
        student, teacher = student.to(dev), teacher.to(dev)
        model = student
        transform = DINOTransform(global_crop_size=args.size, local_crop_size=args.local or args.size * 3 // 7,
                                  n_local_views=6)
        criterion = DINOLoss(output_dim=65536, warmup_teacher_temp_epochs=5).to(dev)
        optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4)

        def step(views, epoch):
            update_momentum(student, teacher, m=0.996)
            views = [v.to(dev) for v in views]
            teacher_out = [teacher["head"](teacher["backbone"](v)) for v in views[:2]]
            student_out = [student["head"](student["backbone"](v)) for v in views]
            return criterion(teacher_out, student_out, epoch=epoch)

    data = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=True)
    done, wait, t0, epoch = 0, 0.0, None, 0
    torch.cuda.reset_peak_memory_stats() if dev.type == "cuda" else None
    while done < args.skip + args.steps:
        it = iter(loader)
        while done < args.skip + args.steps:
            w = time.perf_counter()
            try:
                views, _ = next(it)
            except StopIteration:
                break
            if t0 is not None:
                wait += time.perf_counter() - w
            loss = step(views, epoch)
            loss.backward()
            if name != "simclr_r50":
                model["head"].cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == args.skip:
                sync(args.device)
                t0 = time.perf_counter()
        epoch += 1
    sync(args.device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"images_s": args.steps * batch / elapsed, "data_wait": wait / elapsed, "peak_gb": peak}


# ------------------------------------------------------------------ sslpipe, the real command
# sslpipe rows: their dataset overrides
LOADER_ROWS = {"gpu": ["dataset.loader=gpu"], "gpu_serial": ["dataset.loader=gpu", "dataset.decode_ahead=0"],
               "stream": ["dataset.loader=stream"]}


def sslpipe_overrides(name: str, args, root: Path, row: str) -> list[str]:
    return [*WORKLOADS[name]["overrides"], *common_overrides(name, args.size, args.batch[name], args.local),
            f"device={args.device}", "dataset=imagefolder", f"dataset.root={root}", *LOADER_ROWS[row],
            f"stage.pretrain.loop.max_steps={args.skip + args.steps}", "stage.pretrain.loop.epochs=1000",
            f"stage.pretrain.loop.log_every={args.log_every}"]


def sslpipe_run(name: str, args, root: Path, row: str, tmp: Path) -> dict:
    from mlflow.tracking import MlflowClient

    tag = f"{name}-{row}"
    store = f"sqlite:///{tmp}/mlflow-{tag}.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "SSLPIPE_PROGRESS": "log", "HYDRA_FULL_ERROR": "1"}
    overrides = sslpipe_overrides(name, args, root, row)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sslpipe", *overrides, f"tracking.artifact_root={tmp}/art-{tag}",
                          f"hydra.run.dir={tmp}/run-{tag}"], cwd=tmp, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"sslpipe ({tag}) failed:\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=store)
    run = client.search_runs(client.get_experiment_by_name("sslpipe").experiment_id, order_by=["start_time DESC"])[0]
    history = {key: sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
               for key in ("train/images_per_s", "train/data_wait")}
    rates = [m.value for m in history["train/images_per_s"] if m.step > args.skip]
    waits = [m.value for m in history["train/data_wait"] if m.step > args.skip]
    if not rates:
        raise RuntimeError(f"sslpipe ({tag}) logged no train/images_per_s after step {args.skip}: {history}")
    seconds = [args.log_every * args.batch[name] / r for r in rates]  # each window's time
    return {"images_s": len(rates) * args.log_every * args.batch[name] / sum(seconds),
            "data_wait": sum(w * s for w, s in zip(waits, seconds)) / sum(seconds), "wall_s": wall,
            "command": "python -m sslpipe " + " ".join(overrides), "loader_tag": run.data.tags.get("sslpipe.loader"),
            # each logged window (last step, images/s, data wait): where an epoch boundary's wait falls
            "windows": [(r.step, round(r.value), round(w.value, 3)) for r, w in
                        zip(history["train/images_per_s"], history["train/data_wait"])]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--rows", nargs="+", default=["bare", "augmented", "gpu", "stream", "lightly", "compiled"],
                   choices=["bare", "augmented", "gpu", "gpu_serial", "stream", "lightly", "compiled"])
    p.add_argument("--budget-s", type=float, default=None, help="rows not started after this many seconds are skipped")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--local", type=int, default=96)
    p.add_argument("--simclr-batch", type=int, default=512)
    p.add_argument("--dino-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--skip", type=int, default=10, help="untimed steps first (cuDNN autotune, workers filling)")
    p.add_argument("--log-every", type=int, default=10, help="sslpipe's stage.pretrain.loop.log_every")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="lightly's DataLoader")
    p.add_argument("--images", type=int, default=40_000, help="JPEGs in the folder (hard links to a pool)")
    p.add_argument("--pool", type=int, default=512, help="distinct JPEGs (300-500 px) behind the links")
    p.add_argument("--peak", type=float, default=989.0, help="dense bf16 TFLOP/s of the GPU")
    p.add_argument("--profile", action="store_true", help="top CUDA kernels of the bare step")
    p.add_argument("--smoke", action="store_true", help="toy sizes: every path runs in a minute on a CPU")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    if args.smoke:
        args.size, args.local, args.simclr_batch, args.dino_batch = 64, 32, 8, 4
        args.steps, args.skip, args.log_every, args.images, args.pool, args.workers = 4, 2, 2, 200, 20, 1
    args.batch = {"simclr_r50": args.simclr_batch, "dino_vits16": args.dino_batch}

    header("GPU pretraining end to end from JPEGs: bare loop / sslpipe / lightly", args.device)
    started = time.perf_counter()
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="sslpipe-gpu-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    per_class = 1000 if args.images >= 10_000 else 50
    pool = make_pool(tmp / "pool", args.pool)
    make_tree(tmp / "jpegs", per_class, pool, classes=max(1, args.images // per_class))
    print(f"JPEG folder: {args.images} links to {args.pool} distinct 300-500 px JPEGs, made in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    for name in args.workloads:
        print(f"\n## {WORKLOADS[name]['title']}, batch {args.batch[name]}", flush=True)
        results = {}
        for row in args.rows:
            t = time.perf_counter()
            try:
                if args.budget_s and time.perf_counter() - started > args.budget_s:
                    print(f"{row}: skipped (past --budget-s {args.budget_s:.0f})", flush=True)
                    continue
                if row in ("bare", "compiled", "augmented"):
                    results[row] = bare(name, args, tmp, compile=row == "compiled", augment=row == "augmented")
                elif row == "lightly":
                    results[row] = lightly_loop(name, args, tmp / "jpegs")
                else:
                    results[row] = sslpipe_run(name, args, tmp / "jpegs", row, tmp)
            except Exception as e:  # one failing row must not lose the others' figures
                print(f"{row}: FAILED: {type(e).__name__}: {str(e)[-2500:]}", flush=True)
                continue
            finally:  # the row's model, optimizer and workers gone before the next row
                gc.collect()
                if args.device.startswith("cuda"):
                    import torch

                    torch.cuda.empty_cache()
            print(f"{row}: {({k: v for k, v in results[row].items() if k != 'profile'})} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        flops = results.get("bare", {}).get("flops_per_image")
        base = results.get("bare", {}).get("images_s")
        lightly = results.get("lightly", {}).get("images_s")
        labels = {"bare": "bare PyTorch loop, views resident on the GPU",
                  "augmented": "bare loop + sslpipe's on-GPU views made every step",
                  "compiled": "bare loop, backbone + projector torch.compile'd",
                  "gpu": "sslpipe, dataset.loader=gpu (nvJPEG + roi_align, 2 batches decoded ahead)",
                  "gpu_serial": "sslpipe, dataset.loader=gpu dataset.decode_ahead=0 (decode in series)",
                  "stream": "sslpipe, dataset.loader=stream (DataLoader workers)",
                  "lightly": f"lightly example loop ({args.workers} DataLoader workers, fp32)"}
        rows = []
        for row, r in results.items():
            tflops = flops * r["images_s"] / 1e12 if flops else None
            rows.append([labels[row], r["images_s"], "-" if r.get("data_wait") is None else f"{100 * r['data_wait']:.1f} %",
                         "-" if tflops is None else f"{tflops:.0f}",
                         "-" if tflops is None else f"{100 * tflops / args.peak:.1f} %",
                         "-" if base is None else f"{r['images_s'] / base:.2f}x",
                         "-" if lightly is None else f"{r['images_s'] / lightly:.2f}x",
                         "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.1f}"])
        print()
        table(["path", "images/s", "data wait", "TFLOP/s", "of bf16 peak", "vs bare", "vs lightly", "peak GiB"], rows)
        if flops:
            print(f"\nmodel FLOPs per image (fwd + bwd): {flops / 1e9:.1f} GFLOP; "
                  f"host-device syncs inside the bare step: {results['bare']['syncs']}")
        if "compiled" in results:
            print(f"\ntorch.compile: first step {results['compiled']['first_step_s']:.1f} s (eager first step "
                  f"{results.get('bare', {}).get('first_step_s', float('nan')):.1f} s)")
        for row in LOADER_ROWS:
            if row in results:
                print(f"\n{row} command: `{results[row]['command']}` (run wall time {results[row]['wall_s']:.0f} s)")
        if "profile" in results.get("bare", {}):
            print("\ntop CUDA kernels of the bare step (share of GPU time, launches per step):")
            for key, share, count in results["bare"]["profile"]:
                print(f"  {share:5.1f} %  x{count:<4d} {key}")
    print(f"\nsteps: {args.skip} untimed, then {args.steps} timed; sslpipe figures are its logged windows of "
          f"{args.log_every} steps after step {args.skip}")


if __name__ == "__main__":
    main()
