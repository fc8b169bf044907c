"""The GPU-decode path (`dataset.loader=gpu`): workers only read each file's bytes and draw its
crop boxes from the JPEG header's size; the training process decodes the whole batch with
torchvision's `decode_jpeg(..., device="cuda")` (nvJPEG, nothing to install beyond
torchvision) and cuts every view on the device with `torchvision.ops.roi_align` (bilinear,
averaging several samples per output pixel when shrinking). The boxes are the streaming
path's (`TrainCrops`' generator per (seed, epoch, index)), so order, crops and resume are the
same; only the resampling filter differs (roi_align vs PIL's bilinear).

The same code runs with `device="cpu"` (libjpeg-turbo through torchvision), which is how it is
tested on machines without a GPU. Files that are not JPEGs (PNG, ...) are decoded with
`torchvision.io.decode_image` on the CPU and moved over. NVIDIA DALI, which also moves the crop
and resize into the decoder, is not wired in: it is an optional extra that could replace this
module behind the same interface."""

from __future__ import annotations

import torch
from PIL import Image

from sslpipe.data.stream import CropSpec, centre_box, draw_boxes


class EncodedCrops:
    """Worker side: (file bytes as a uint8 tensor, float32 (V, 4) boxes) for one image; nothing
    decoded. `specs` None: the eval view's centre box."""

    def __init__(self, specs: list[CropSpec] | None, crop_ratio: float):
        from sslpipe.data.fastaug import RandomResizedCrop

        self.specs, self.crop_ratio = specs, crop_ratio
        self.croppers = None if specs is None else [RandomResizedCrop((s.size, s.size), s.scale, s.ratio) for s in specs]

    def __call__(self, image: Image.Image, path: str, generator: torch.Generator | None):
        w, h = image.size  # from the header: PIL opens lazily
        if self.specs is None:
            boxes = torch.tensor([centre_box(w, h, self.crop_ratio)], dtype=torch.float32)
        else:
            boxes = torch.from_numpy(draw_boxes(self.croppers, self.specs, w, h, generator)).float()
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        return data, boxes


def collate_encoded(batch):
    """[((bytes, boxes), label), ...] -> (list of bytes, (B, V, 4) boxes, (B,) labels)."""
    datas = [item[0][0] for item in batch]
    boxes = torch.stack([item[0][1] for item in batch])
    labels = torch.as_tensor([int(item[1]) for item in batch], dtype=torch.long)
    return (datas, boxes), labels


def decode_batch(datas: list[torch.Tensor], channels: int, device: torch.device) -> list[torch.Tensor]:
    """uint8 (C, H, W) images on `device`: JPEGs batched through decode_jpeg on the device, the
    rest through decode_image on the CPU."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    is_jpeg = [len(d) > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8 for d in datas]
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpegs = [i for i, j in enumerate(is_jpeg) if j]
    if jpegs and device.type == "cuda":
        # decode_jpeg on CUDA allocates its outputs on the caller's stream, then lets nvJPEG write
        # them from a private stream that does not wait for the caller's queued kernels
        # (pytorch/vision PR 9606): a block the previous training step frees while its kernels
        # are still queued can be overwritten before they read it. Measured here: ResNet-50
        # SimCLR, batch 512 at 224 px on an H200, loss NaN within 10 steps with loader=gpu and
        # finite with loader=stream (docs/benchmarks.md, 2026-12-04). Waiting for the stream first
        # closes the race at the cost of overlapping this decode with the previous step.
        torch.cuda.current_stream(device).synchronize()
    if jpegs:
        decoded = decode_jpeg([datas[i] for i in jpegs], mode=mode, device=device)
        for i, image in zip(jpegs, decoded):
            out[i] = image
    for i, j in enumerate(is_jpeg):
        if not j:
            out[i] = decode_image(datas[i], mode=mode).to(device)
    return out  # type: ignore[return-value]


def cut_views(images: list[torch.Tensor], boxes: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """View v of every image: uint8 (B, C, sizes[v], sizes[v]), cut from its box and resized.

    The images differ in size, so roi_align runs once per image, but with all of that image's
    views of one size in one call (DINO's 2 + 6 views: 2 calls per image, not 8), and the boxes
    go to the device once per batch rather than once per crop."""
    from torchvision.ops import roi_align

    boxes = boxes.to(images[0].device, non_blocking=True)
    groups: dict[int, list[int]] = {}
    for v, size in enumerate(sizes):
        groups.setdefault(size, []).append(v)
    crops: dict[int, list[torch.Tensor]] = {size: [] for size in groups}
    for i, image in enumerate(images):
        pixels = image.unsqueeze(0).float()
        for size, vs in groups.items():
            crops[size].append(roi_align(pixels, [boxes[i, vs]], (size, size), spatial_scale=1.0,
                                         sampling_ratio=-1, aligned=True))
    views: list[torch.Tensor] = [torch.empty(0)] * len(sizes)
    for size, vs in groups.items():
        stacked = torch.stack(crops[size]).round_().clamp_(0, 255).to(torch.uint8)  # (B, views, C, s, s)
        for k, v in enumerate(vs):
            views[v] = stacked[:, k].contiguous()
    return tuple(views)


def view_sizes(specs: list[CropSpec] | None, eval_size: int) -> list[int]:
    return [eval_size] if specs is None else [s.size for s in specs for _ in range(s.count)]


def require_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("dataset.loader=gpu decodes JPEGs on the GPU, but CUDA is not available here; "
                           "use dataset.loader=stream (CPU decode in DataLoader workers) or auto")

