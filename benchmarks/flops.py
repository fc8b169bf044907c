"""Achieved TFLOP/s of sslpipe's pretraining step against the GPU's bf16 dense peak.

FLOPs of one training step (augmentation + forward + backward of the method, counted by
torch.utils.flop_counter.FlopCounterMode: matrix products and convolutions) divided by the
step's measured time in the real loop (sslpipe.engine.Loop with MLflow logging, bf16
autocast, the stage's fast path). Peak: H100 SXM bf16 dense 989 TFLOP/s (NVIDIA's data
sheet; H200 the same); `--peak` for another GPU.

    python benchmarks/flops.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Training, default_device, header, make_npy, sync, table  # noqa: E402

CASES = {
    "resnet18 (CIFAR stem) SimCLR, 32 px, batch 512": ["method=simclr", "backbone=resnet18", "stage.pretrain.batch_size=512"],
    "vit_small (patch 4) SimCLR, 32 px, batch 512": ["method=simclr", "backbone=vit_small", "stage.pretrain.batch_size=512"],
    "vit_small (patch 4) DINO 2+2 views, 32 px, batch 256": ["method=dino", "backbone=vit_small", "stage.pretrain.batch_size=256"],
}


def step_flops(tr: Training) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    images, labels = next(iter(tr.loader()))
    images, labels = images.to(tr.device), labels.to(tr.device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(tr.device.type, dtype=torch.bfloat16, enabled=tr.device.type == "cuda"):
            loss = tr.step(images, labels, 0.0)
        loss.backward()
    tr.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def timed_loop(tr: Training, steps: int, tmp: Path) -> float:
    from sslpipe.engine import Loop, LoopSettings
    from sslpipe.tracking import Tracker

    st = tr.cfg.stage.pretrain.loop
    run = Tracker(f"sqlite:///{tmp}/mlflow.db", "bench").start_run("flops", {})
    settings = LoopSettings(epochs=10**6, max_steps=steps, warmup_epochs=0, amp=st.amp,
                            checkpoint_every=st.checkpoint_every, log_every=st.log_every)
    (tmp / "last.pt").unlink(missing_ok=True)
    loop = Loop(tr.method, tr.step, tr.optimizer, tr.loader(), settings, tr.device, tmp / "last.pt")
    sync(str(tr.device))
    t = time.perf_counter()
    loop.run(run.log_metrics)
    sync(str(tr.device))
    elapsed = time.perf_counter() - t
    run.end()
    return elapsed / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peak", type=float, default=989.0, help="bf16 dense peak, TFLOP/s")
    p.add_argument("--compile", action="store_true", help="the first case with stage.pretrain.compile=true as well")
    p.add_argument("--cases", nargs="*", default=list(CASES))
    args = p.parse_args()
    header("Achieved TFLOP/s in pretraining (bf16 autocast) vs the GPU's bf16 peak", args.device)
    tmp = Path(tempfile.mkdtemp(prefix="sslpipe-bench-"))
    make_npy(tmp / "npy", 8192, 32)
    rows = []
    for name in args.cases:
        for compiled in ([False, True] if args.compile and name == args.cases[0] else [False]):
            overrides = [*CASES[name], "dataset=npy", f"dataset.root={tmp / 'npy'}", f"stage.pretrain.compile={str(compiled).lower()}"]
            try:
                tr = Training(overrides, args.device, tmp)
                flops = step_flops(tr)
                timed_loop(tr, 5, tmp)  # warm-up (cuDNN autotune, compilation)
                step_s = timed_loop(tr, args.steps, tmp)
            except Exception as err:  # noqa: BLE001 - one case failing should not hide the others
                rows.append([name + (" + compile" if compiled else ""), f"failed: {type(err).__name__}: {str(err)[:120]}", "", "", "", ""])
                continue
            tflops = flops / step_s / 1e12
            rows.append([name + (" + compile" if compiled else ""), f"{flops / 1e12:.3f}", f"{step_s * 1e3:.1f}",
                         f"{tr.batch_size / step_s:,.0f}", f"{tflops:.1f}", f"{100 * tflops / args.peak:.1f} %"])
    print(f"peak: {args.peak} TFLOP/s bf16 dense; {args.steps} timed steps after 5 warm-up steps; MLflow logging on\n")
    table(["case", "TFLOP per step", "ms per step", "images/s", "TFLOP/s", "of peak"], rows)


if __name__ == "__main__":
    main()
