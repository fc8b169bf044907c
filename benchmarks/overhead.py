"""sslpipe's training loop vs a bare hand-written PyTorch loop, in images/s.

Both sides train the same model (same init), same loss, same batches, same optimizer and the
same on-device augmentation; the sslpipe side is `sslpipe.engine.Loop` with every step's
metrics logged through `sslpipe.tracking` to a temporary SQLite MLflow store (log_every=1),
the progress display where the loop has one, and checkpoints at the default interval (plus
the one at the end). The two alternate round by round; the ratio is of the medians.

    python benchmarks/overhead.py                      # digits + smallcnn (the default run), CPU
    python benchmarks/overhead.py --device cuda --synthetic 8192 -- backbone=resnet18 dataset=npy
"""

from __future__ import annotations

import argparse
import inspect
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Training, default_device, header, make_npy, median, sync, table  # noqa: E402


def sslpipe_loop(tr: Training, steps: int, tmp: Path, tracker) -> float:
    from sslpipe.engine import Loop, LoopSettings

    st = tr.cfg.stage.pretrain.loop
    run = tracker.start_run("overhead", {"sslpipe.stage": "pretrain"})
    settings = LoopSettings(epochs=10**6, max_steps=steps, grad_accum=1, warmup_epochs=st.warmup_epochs,
                            min_lr_ratio=st.min_lr_ratio, amp=st.amp, checkpoint_every=st.checkpoint_every,
                            log_every=1)
    kwargs = {}
    if "progress" in inspect.signature(Loop).parameters:  # the progress display, where the loop has one
        from sslpipe.progress import Progress

        kwargs["progress"] = Progress("overhead", stream=io.StringIO(), mode="tty")  # drawn, to a buffer
    loop = Loop(tr.method, tr.step, tr.optimizer, tr.loader(), settings, tr.device, tmp / "last.pt",
                **kwargs)
    sync(str(tr.device))
    t0 = time.perf_counter()
    loop.run(run.log_metrics)
    run.end()  # the buffered metrics are written: nothing is left behind
    sync(str(tr.device))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--synthetic", type=int, default=0, help="make N synthetic 32 px images for dataset=npy")
    p.add_argument("overrides", nargs="*", default=[], help="config overrides, e.g. backbone=resnet18")
    args = p.parse_args()

    from sslpipe.tracking import Tracker

    header("Loop overhead: sslpipe.engine.Loop + MLflow every step vs a bare PyTorch loop", args.device)
    tmp = Path(tempfile.mkdtemp(prefix="sslpipe-bench-"))
    overrides = list(args.overrides) or ["method=simclr", "backbone=smallcnn", "dataset=digits"]
    if args.synthetic:
        make_npy(tmp / "npy", args.synthetic, 32)
        overrides += [f"dataset.root={tmp / 'npy'}"]
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "bench", str(tmp / "artifacts"))
    tracker.start_run("warm-up", {}).end()  # the store's tables exist before anything is timed

    bare, ours = [], []
    for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
        steps = args.steps if r else max(3, args.steps // 5)
        tr = Training(overrides, args.device, tmp)
        t0 = time.perf_counter()
        tr.bare_loop(steps)
        t_bare = time.perf_counter() - t0
        tr = Training(overrides, args.device, tmp)
        (tmp / "last.pt").unlink(missing_ok=True)
        t_ours = sslpipe_loop(tr, steps, tmp, tracker)
        if r:
            bare.append(steps * tr.batch_size / t_bare)
            ours.append(steps * tr.batch_size / t_ours)
    ratios = [o / b for o, b in zip(ours, bare)]
    print(f"config: {' '.join(overrides)} stage.pretrain.batch_size={tr.batch_size}; {args.steps} steps x {args.rounds} rounds, "
          f"log_every=1, checkpoint_every={tr.cfg.stage.pretrain.loop.checkpoint_every} (+ one at the end)\n")
    table(["loop", "images/s (median)", "min", "max", "ratio vs bare"], [
        ["bare PyTorch loop", median(bare), min(bare), max(bare), 1.0],
        ["sslpipe Loop + MLflow every step", median(ours), min(ours), max(ours), median(ours) / median(bare)],
    ])
    print(f"per-round ratios: {', '.join(f'{x:.3f}' for x in ratios)}; median {median(ratios):.3f}\n")


if __name__ == "__main__":
    main()
