"""The cost of the MLflow path used in training, per logged step, as a share of a step.

The path is the one stage=pretrain uses: `Run.log_metrics` (a buffer) with a `log_batch`
flush every `flush_every` calls to a SQLite store, and the final flush in `Run.end`. Its
cost per call (flushes amortised) is set against the bare training step of the same run
(the default pretrain step unless overrides say otherwise), measured in this process.

    python benchmarks/tracking.py
    python benchmarks/tracking.py --device cuda --synthetic 8192 -- backbone=resnet18 dataset=npy
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Training, default_device, header, make_npy, median, table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--calls", type=int, default=2000, help="log_metrics calls (logged steps) to time")
    p.add_argument("--steps", type=int, default=20, help="training steps to time")
    p.add_argument("--synthetic", type=int, default=0)
    p.add_argument("overrides", nargs="*", default=[])
    args = p.parse_args()

    from sslpipe.tracking import Tracker

    header("Tracking cost per logged step vs a training step", args.device)
    tmp = Path(tempfile.mkdtemp(prefix="sslpipe-bench-"))
    overrides = list(args.overrides) or ["method=simclr", "backbone=smallcnn", "dataset=digits"]
    if args.synthetic:
        make_npy(tmp / "npy", args.synthetic, 32)
        overrides += [f"dataset.root={tmp / 'npy'}"]

    # ---------------------------------------------------------------- the training step (baseline)
    tr = Training(overrides, args.device, tmp)
    tr.bare_loop(3)  # warm-up
    t0 = time.perf_counter()
    tr.bare_loop(args.steps)
    step_s = (time.perf_counter() - t0) / args.steps
    log_every = tr.cfg.stage.pretrain.loop.log_every

    # ---------------------------------------------------------------- the tracking path
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "bench", str(tmp / "artifacts"))
    tracker.start_run("warm-up", {}).end()
    run = tracker.start_run("tracking", {"sslpipe.stage": "pretrain"})
    metrics = {"train/loss": 1.0, "train/lr": 1e-3, "train/images_per_s": 1000.0, "train/data_wait": 0.01,
               "train/epoch": 0.5}  # the five values the loop logs
    per_call, t_total = [], time.perf_counter()
    for i in range(1, args.calls + 1):
        t = time.perf_counter()
        run.log_metrics({k: v + i for k, v in metrics.items()}, i * log_every)
        per_call.append(time.perf_counter() - t)
    t = time.perf_counter()
    run.end()
    end_s = time.perf_counter() - t
    total_s = time.perf_counter() - t_total
    cost = total_s / args.calls  # flushes and the final write amortised over the calls
    stored = len(tracker.client.get_metric_history(run.id, "train/loss"))
    assert stored == args.calls, f"{stored} of {args.calls} values stored"

    print(f"config: {' '.join(overrides)} stage.pretrain.batch_size={tr.batch_size}; {args.calls} logged steps of "
          f"{len(metrics)} metrics, flush every {run.flush_every} calls; all {stored} values read back from the store\n")
    flushes = sorted(per_call)[-max(1, args.calls // run.flush_every):]
    table(["what", "value"], [
        ["training step (bare loop)", f"{step_s * 1e3:.2f} ms"],
        ["log_metrics, median call (buffer append)", f"{median(per_call) * 1e6:.1f} us"],
        ["log_metrics, a call that flushes (median of those)", f"{median(flushes) * 1e3:.2f} ms"],
        ["final flush + end of run", f"{end_s * 1e3:.2f} ms"],
        ["cost per logged step, everything amortised", f"{cost * 1e3:.3f} ms"],
        [f"share of training time at log_every={log_every} (default)", f"{100 * cost / (log_every * step_s):.3f} %"],
        ["share of training time at log_every=1", f"{100 * cost / step_s:.3f} %"],
    ])


if __name__ == "__main__":
    main()
