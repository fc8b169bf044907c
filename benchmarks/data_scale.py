"""Time and peak memory of `stage=pretrain dataset=imagefolder dataset.image_size=224` on
ImageNet-1k-shaped folders of 10k, 128k and 1.28M JPEGs (1000 classes).

Each size runs the real CLI in a subprocess for 2 training steps of 32 images (the default
smallcnn backbone, whose activations at 224 px are most of the main process's memory). The
figures: time from launch to the first training step (its train/loss timestamp in MLflow),
the wall clock of the whole command, the peak resident memory of the main process (exact,
from getrusage) and the summed peaks of its DataLoader workers (pages they share with the
main process counted again in each). Each folder is listed twice: the first run writes the file
index, the second reuses it. With `--memory-baseline`, the smallest folder is also read with
`dataset.loader=memory` (every image decoded into one tensor, the pre-streaming path).

    python benchmarks/data_scale.py --workdir /tmp/sslpipe-scale --sizes 1000 10000 128000 1281000 --memory-baseline 10000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, table  # noqa: E402
from _imagenet_like import make_pool, make_tree  # noqa: E402


def _hwm(pid: int) -> int:
    """Peak resident memory (VmHWM, bytes) of a live process, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def run_once(root: Path, workdir: Path, name: str, extra: list[str]) -> dict:
    """Run the CLI; returns wall clock, time to the first step (the first train/loss metric's
    timestamp in MLflow), the main process's peak RSS (getrusage of the reaped child: exact)
    and the summed peak RSS of its DataLoader workers (VmHWM, read every 0.1 s)."""
    import psutil
    from mlflow.tracking import MlflowClient

    cmd = [sys.executable, "-m", "sslpipe", "stage=pretrain", "dataset=imagefolder", f"dataset.root={root}",
           "dataset.image_size=224", "stage.pretrain.loop.max_steps=2", "stage.pretrain.batch_size=32", "stage.pretrain.loop.log_every=1",
           f"tracking.experiment={name}", f"hydra.run.dir={workdir / 'runs' / name}", *extra]
    log = open(workdir / f"{name}.log", "w")
    start_epoch, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=workdir, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    workers: dict[int, int] = {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                workers[child.pid] = max(workers.get(child.pid, 0), _hwm(child.pid))
        except psutil.Error:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    log.close()
    out = (workdir / f"{name}.log").read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{out[-3000:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/outputs/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name(name).experiment_id])[0]
    first = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "train/loss")) / 1000
    loader = run.data.tags.get("sslpipe.loader", "?")
    return {"seconds": seconds, "first_step": first - start_epoch, "main": usage.ru_maxrss * 1024 / 1e9,
            "workers": sum(workers.values()) / 1e9, "n_workers": len(workers), "loader": loader}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sslpipe-scale"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 128_000, 1_281_000])
    parser.add_argument("--pool", type=int, default=2000, help="distinct JPEGs the folders link to")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--listing", action="store_true", help="also time listing the largest folder")
    parser.add_argument("--memory-baseline", type=int, default=None, metavar="SIZE",
                        help="also read the folder of this size with dataset.loader=memory")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    header("Data at scale: time and peak memory of stage=pretrain on ImageNet-shaped folders", "cpu")
    pool = make_pool(args.workdir / "pool", args.pool)
    rows = []
    for size in args.sizes:
        root = args.workdir / f"imagenet_{size}"
        built = make_tree(root, size // 1000, pool)
        print(f"folder {root}: {size:,} images ({built:.0f} s to link)", flush=True)
        for index in (root / "train" / ".sslpipe-index.npz", ):
            index.unlink(missing_ok=True)
        runs = [("first (writes the index)", []), ("second (index reused)", [])]
        if size == args.memory_baseline:
            runs.append(("dataset.loader=memory", ["dataset.loader=memory", "dataset.memory_budget_gb=1000"]))
        for label, extra in runs:
            r = run_once(root, args.workdir, f"s{size}_{len(rows)}_{int(time.time())}", [*args.overrides, *extra])
            rows.append([f"{size:,}", label, r["loader"], round(r["first_step"], 1), round(r["seconds"], 1),
                         round(r["main"], 2), f"{r['workers']:.2f} ({r['n_workers']})"])
            print(rows[-1], flush=True)
    print()
    table(["images", "run", "loader", "time to first step (s)", "wall clock, 2 steps (s)",
           "peak RSS, main process (GB)", "peak RSS, child processes (GB, count)"], rows)
    if args.listing:
        print()
        listing(args.workdir / f"imagenet_{max(args.sizes)}" / "train")


def listing(folder: Path) -> None:
    """Listing the largest folder: sslpipe's threaded scandir vs torchvision's make_dataset
    (os.walk in one thread), alternating, after a warm-up pass of each (warm page cache)."""
    import statistics

    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    from sslpipe.data.files import list_class_folders

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    times: dict[str, list[float]] = {"sslpipe list_class_folders (8 threads)": [], "torchvision make_dataset": []}
    for _ in range(3):
        for name in times:
            start = time.perf_counter()
            if name.startswith("sslpipe"):
                n = len(list_class_folders(str(folder), classes)[0])
            else:
                n = len(make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS))
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torchvision make_dataset"])
    table(["listing " + f"{n:,} files", "seconds (median of 3)", "vs torchvision", "rounds"],
          [[k, round(statistics.median(v), 2), f"{base / statistics.median(v):.2f}x faster",
            ", ".join(f"{x:.2f}" for x in v)] for k, v in times.items()])


if __name__ == "__main__":
    main()
