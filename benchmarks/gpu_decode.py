"""GPU JPEG decode against CPU decode on the same machine (issue 11, must-show 2, GPU part):
two 224 px views per image cut from the full-resolution JPEG, through sslpipe's own GPU path
(`sslpipe.data.gpu_decode`: nvJPEG `decode_jpeg(device="cuda")` + `roi_align` crops) and the
same functions on the CPU (libjpeg-turbo, crops on the CPU, then copied over); then a
ResNet-50 SimCLR-shaped training step (timm resnet50, bf16, two views, InfoNCE written out here
because the device machine has no lightly) fed by each, with the share of the step spent
waiting for data. Needs only torch, torchvision, timm, PIL, numpy.

    python benchmarks/gpu_decode.py --images 512 --batch 128 --steps 10

Images are generated here (smooth colour fields plus noise, 300-500 px JPEG quality 90); the
decode runs in the training process, one batch after another (no worker overlap): this is the
decoder's own rate, not a loader's."""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpegs(n: int, seed: int = 0) -> list[torch.Tensor]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(300, 501, 2))
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / rng.uniform(5, 60) + c) * np.cos(y / rng.uniform(5, 60)) for c in range(3)], -1)
        image = ((base + 1) * 110 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def boxes_for(datas: list[torch.Tensor], seed: int) -> torch.Tensor:
    """Two random-resized-crop boxes (scale 0.2-1) per image, from its JPEG header's size."""
    from PIL import Image

    g = np.random.default_rng(seed)
    boxes = []
    for d in datas:
        w, h = Image.open(io.BytesIO(d.numpy().tobytes())).size
        views = []
        for _ in range(2):
            area = g.uniform(0.2, 1.0) * w * h
            ratio = np.exp(g.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = min(w, np.sqrt(area * ratio)), min(h, np.sqrt(area / ratio))
            x0, y0 = g.uniform(0, w - cw), g.uniform(0, h - ch)
            views.append([x0, y0, x0 + cw, y0 + ch])
        boxes.append(views)
    return torch.tensor(boxes, dtype=torch.float32)


def batches(datas, batch: int, device: torch.device, decode_on: str):
    from sslpipe.data.gpu_decode import cut_views, decode_batch

    step = 0
    while True:
        start = (step * batch) % (len(datas) - batch + 1)
        part = datas[start:start + batch]
        boxes = boxes_for(part, step)
        images = decode_batch(part, 3, torch.device(decode_on))
        views = cut_views(images, boxes, [224, 224])
        yield tuple(v.to(device, non_blocking=True) for v in views)
        step += 1


def info_nce(z1: torch.Tensor, z2: torch.Tensor, t: float = 0.2) -> torch.Tensor:
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / t
    sim.fill_diagonal_(-1e9)
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return torch.nn.functional.cross_entropy(sim, target)


def main() -> None:
    import timm

    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    datas = make_jpegs(args.images)
    print(f"{len(datas)} JPEGs, mean {np.mean([len(d) for d in datas]) / 1024:.0f} KiB", flush=True)
    rows = []
    for decode_on in ("cpu", "cuda"):  # decode alone
        it = batches(datas, args.batch, dev, decode_on)
        next(it)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        torch.cuda.synchronize()
        rows.append((f"decode + 2 crops on {decode_on}", args.steps * args.batch / (time.perf_counter() - t), None))
        print(rows[-1], flush=True)
    model = timm.create_model("resnet50", num_classes=0).to(dev).to(memory_format=torch.channels_last)
    head = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128)).to(dev)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255

    def step(v1, v2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x = [((v.float() - mean) / std).contiguous(memory_format=torch.channels_last) for v in (v1, v2)]
            loss = info_nce(head(model(x[0])), head(model(x[1])))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for source in ("resident (no decode)", "cpu", "cuda"):
        it = batches(datas, args.batch, dev, "cuda" if source.startswith("resident") else source)
        fixed = next(it) if source.startswith("resident") else None
        for _ in range(2):
            step(*(fixed or next(it)))
        torch.cuda.synchronize()
        wait, t = 0.0, time.perf_counter()
        for _ in range(args.steps):
            torch.cuda.synchronize()  # the previous step done: the window below times the data alone
            w = time.perf_counter()
            views = fixed or next(it)
            torch.cuda.synchronize()
            wait += time.perf_counter() - w
            step(*views)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
        rows.append((f"ResNet-50 SimCLR step, data: {source}", args.steps * args.batch / total, wait / total))
        print(rows[-1], flush=True)
    print("\n| path | images/s | data wait share of the step |\n|---|---|---|")
    for name, rate, wait in rows:
        print(f"| {name} | {rate:.0f} | {'-' if wait is None else f'{100 * wait:.1f} %'} |")
    print(f"\nbatch {args.batch}, {args.steps} timed batches after warm-up, decode in the training process "
          f"(no DataLoader workers), bf16 autocast, channels_last")


if __name__ == "__main__":
    main()
