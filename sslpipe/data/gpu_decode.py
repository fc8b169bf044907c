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

import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

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
        # closes the race. In `DecodedBatches` the caller's stream is a side stream that only the
        # decoding thread uses, so this waits for that thread's previous batch, not for training.
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


class DecodedBatches:
    """Iterates (views, labels) from the workers' ((bytes, boxes), labels) batches, decoding and
    cutting each on `device`. With `ahead` > 0, `ahead` batches are decoded in background threads
    while the training step runs (as DALI's pipeline does; written here because torchvision has no
    such wrapper), each thread on its own CUDA side stream; the training stream waits on an event
    per batch and `record_stream` keeps the allocator from handing the views' memory back to the
    side stream before training has read them. Batches come out in the workers' order, so crops,
    order and resume are those of `ahead=0` (decode in series in the training thread).

    Measured on an H200 (ResNet-50 SimCLR, batch 512 at 224 px; docs/benchmarks.md): in series,
    55.5 % of the step waited on decode."""

    def __init__(self, batches: Iterable, view_sizes: list[int], channels: int, device: torch.device, ahead: int = 2):
        if ahead < 0:
            raise ValueError(f"decode_ahead must be >= 0 (0: decode in series), got {ahead}")
        if device.type == "cuda" and device.index is None:
            # the decode threads start on GPU 0, whatever the rank's device: fix the index here, in
            # the training thread, where distributed.setup has set it (torch.cuda.set_device)
            device = torch.device("cuda", torch.cuda.current_device())
        self.batches, self.sizes, self.channels, self.device, self.ahead = batches, view_sizes, channels, device, ahead
        self._local = threading.local()

    def _decode(self, batch):
        (datas, boxes), labels = batch
        return cut_views(decode_batch(datas, self.channels, self.device), boxes, self.sizes), labels

    def _decode_on_side_stream(self, batch):
        if self.device.type != "cuda":
            return *self._decode(batch), None
        if getattr(self._local, "stream", None) is None:
            self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self._local.stream):
            views, labels = self._decode(batch)
            done = torch.cuda.Event()
            done.record(self._local.stream)
        return views, labels, done

    def __iter__(self):
        if self.ahead == 0:
            for batch in self.batches:
                yield self._decode(batch)
            return
        with ThreadPoolExecutor(self.ahead, thread_name_prefix="sslpipe-decode") as pool:
            source = iter(self.batches)
            pending: collections.deque = collections.deque()
            try:
                for batch in source:
                    pending.append(pool.submit(self._decode_on_side_stream, batch))
                    if len(pending) == self.ahead:
                        break
                while pending:
                    views, labels, done = pending.popleft().result()
                    batch = next(source, None)
                    if batch is not None:
                        pending.append(pool.submit(self._decode_on_side_stream, batch))
                    if done is not None:
                        stream = torch.cuda.current_stream(self.device)
                        stream.wait_event(done)
                        for view in views:
                            view.record_stream(stream)
                    yield views, labels
            finally:  # the consumer stopped early (end of the run, preemption): drop what is queued
                for future in pending:
                    future.cancel()


def require_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("dataset.loader=gpu decodes JPEGs on the GPU, but CUDA is not available here; "
                           "use dataset.loader=stream (CPU decode in DataLoader workers) or auto")

