"""The streaming and memory loaders give the same accuracy: the default pipeline on digits,
read as image files through `dataset=imagefolder` with `dataset.loader=memory` and with
`dataset.loader=stream`, three seeds each, mean +- std of every results-table row.

scikit-learn's 8x8 digits are written as PNGs in the ImageNet layout (train/val/test folders,
the same stratified 70/15/15 split as `dataset=digits`); both loaders read the same files with
digits' normalisation and augmentation, 16 px, eval crop ratio 1 (the whole image, as the
digits memory path has it). The memory path cuts training crops from the decoded 16 px image,
the streaming path from the 8 px original.

    python benchmarks/stream_vs_memory.py --workdir /tmp/svm --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_digits(root: Path) -> None:
    """The digits splits of `dataset=digits` as <root>/<split>/<digit>/<i>.png (8x8, grey)."""
    from PIL import Image

    from sslpipe.data.digits import load_digits

    if (root / ".complete").exists():
        return
    splits = load_digits(image_size=8)
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        for i, (image, label) in enumerate(zip(split.images, split.labels)):
            folder = root / name / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{i:04d}.png")
    (root / ".complete").write_text("ok")


def digits_overrides() -> list[str]:
    from omegaconf import OmegaConf

    digits = OmegaConf.load(REPO / "conf" / "dataset" / "digits.yaml")
    out = [f"dataset.norm.mean={list(digits.norm.mean)}", f"dataset.norm.std={list(digits.norm.std)}"]
    for key, value in digits.augment.items():
        out.append(f"dataset.augment.{key}={list(value) if OmegaConf.is_list(value) else value}")
    return out


def parse_results(path: Path) -> dict[str, float]:
    """`<step> (<pretrained>)` -> test top-1 from a run's results.md."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("step", "---") and not cells[0].startswith("-"):
            try:
                rows[f"{cells[0]} ({cells[1]})"] = float(cells[2])
            except ValueError:
                continue
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sslpipe-svm"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    header("Streaming vs memory loader: the default pipeline on digits as PNG files", "cpu")
    data = args.workdir / "digits_png"
    write_digits(data)
    common = ["dataset=imagefolder", f"dataset.root={data}", "dataset.image_size=16", "dataset.channels=1",
              "dataset.eval_crop_ratio=1.0", *digits_overrides()]
    results: dict[str, dict[str, list[float]]] = {}
    for loader in ("memory", "stream"):
        for seed in args.seeds:
            run_dir = args.workdir / "runs" / f"{loader}_{seed}"
            cmd = [sys.executable, "-m", "sslpipe", *common, f"dataset.loader={loader}", f"seed={seed}",
                   f"hydra.run.dir={run_dir}"]
            done = subprocess.run(cmd, cwd=args.workdir, env=dict(os.environ), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{loader} seed {seed} failed:\n{done.stderr[-3000:]}")
            for row, top1 in parse_results(run_dir / "results.md").items():
                results.setdefault(row, {}).setdefault(loader, []).append(top1)
            print(f"{loader} seed {seed}: {parse_results(run_dir / 'results.md')}", flush=True)

    def stat(v: list[float]) -> str:
        return f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"
    rows = [[row, stat(by["memory"]), stat(by["stream"]),
             f"{statistics.mean(by['stream']) - statistics.mean(by['memory']):+.4f}"] for row, by in results.items()]
    print()
    table(["step (encoder)", "memory: test top-1", "stream: test top-1", "stream - memory"], rows)
    print(f"\nseeds {args.seeds}; mean ± sample std.")


if __name__ == "__main__":
    main()
