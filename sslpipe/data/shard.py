"""WebDataset tar shards of an image folder: written once, read sequentially on a cluster.

Writing: `python -m sslpipe.data.shard <image folder> <out dir> [--shard-size 1000] [--split train]`
lists the folder with the imagefolder layout rules (`find_layout`, `cached_listing`: torchvision's
`<root>/<class>/<img>` gives `train`; ImageNet's `<root>/train|val|test/<class>/<img>` gives one
shard set per split folder that exists) and writes `<out>/<split>/shard-000000.tar, ...`. Each
sample is two tar members, as WebDataset reads them: `<key>.<ext>`, the image bytes exactly as stored on disk
under their own extension (jpg, png, ...), and `<key>.cls`, the label as text. Samples are in a
fixed class-interleaved shuffle (seed 0), so every shard holds a mix of classes in about their
overall proportions. `<out>/<split>/index.json` records the class names, per shard its name,
count, bytes, sha256 and, per sample, key, extension, source path, label, and the byte offset
and size of the image member's data inside the tar. Everything is written under a temporary
folder in `<out>` and renamed into place at the end: a failed run leaves no shard set behind.

Reading them is `sslpipe.data.shards` (`dataset=shards dataset.root=<out dir>`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from sslpipe.data.files import PathTable, cached_listing
from sslpipe.data.shards import FORMAT, SPLIT_NAMES, VERSION, ShardError

log = logging.getLogger(__name__)

ORDER_SEED = 0


# ================================================================== writing
def _interleaved_order(labels: np.ndarray, seed: int = ORDER_SEED) -> np.ndarray:
    """A permutation of range(len(labels)): each class shuffled, then the classes interleaved
    by spreading class c's k-th member to position (k + u) / n_c (u uniform in [0, 1)), so any
    window of the order holds the classes in about their overall proportions."""
    rng = np.random.default_rng(seed)
    position = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        position[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(position, kind="stable")


def _split_folders(folder: str, only: list[str] | None) -> tuple[list[str], dict[str, Path]]:
    """(class names, {split name: folder}) of an image folder, by imagefolder's layout rules."""
    from sslpipe.data.imagefolder import _classes, find_layout

    try:
        train, val, test = find_layout(folder, "auto", "val", "test")
    except FileNotFoundError as err:
        raise ShardError(str(err).replace("imagefolder: dataset.root=", "image folder ")) from None
    classes = _classes(train)
    if train == Path(folder):
        classes = [c for c in classes if c not in ("val", "test")]
    found = {"train": train, "val": val, "test": test}
    found = {name: path for name, path in found.items() if path is not None}
    if only:
        missing = [s for s in only if s not in found]
        if missing:
            raise ShardError(f"--split {' '.join(missing)}: no such split folder in '{folder}' "
                             f"(found: {', '.join(found)})")
        found = {name: found[name] for name in only}
    return classes, found


def _list_split(path: Path, classes: list[str]) -> tuple[PathTable, np.ndarray]:
    """Images of one split folder with labels in the train classes' indices (a val/test folder
    may lack some classes; one with a class train lacks is an error naming it)."""
    from sslpipe.data.imagefolder import _classes

    present = _classes(path)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ShardError(f"'{path}' has class folders not in the train classes: {unknown[:10]}")
    present = [c for c in classes if c in present]
    table, labels = cached_listing(str(path), present)
    remap = np.array([classes.index(c) for c in present], dtype=np.int64)
    return table, remap[labels] if len(labels) else labels


def _scan_tar(path: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """(sha256 of the file, {member name: (data offset, size)})."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    with tarfile.open(path, "r:") as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
    return digest.hexdigest(), members


def _write_split(name: str, table: PathTable, labels: np.ndarray, classes: list[str], out: Path,
                 shard_size: int) -> dict:
    """One shard set under `out` (a fresh folder); returns its index."""
    from webdataset import TarWriter

    order = _interleaved_order(labels)
    out.mkdir(parents=True)
    shards = []
    for first in range(0, len(order), shard_size):
        shard_name = f"shard-{len(shards):06d}.tar"
        rows = []
        with TarWriter(str(out / shard_name), mtime=0.0, user="sslpipe", group="sslpipe") as writer:
            for k in order[first:first + shard_size].tolist():
                rel = table.relative(k)
                ext = os.path.splitext(rel)[1][1:].lower() or "img"
                key = f"{first + len(rows):09d}"
                with open(table[k], "rb") as f:
                    data = f.read()
                writer.write({"__key__": key, ext: data, "cls": str(int(labels[k])).encode()})
                rows.append((key, ext, rel, int(labels[k])))
        sha, members = _scan_tar(out / shard_name)
        spans = [members[f"{key}.{ext}"] for key, ext, _, _ in rows]
        shards.append({
            "name": shard_name, "count": len(rows), "bytes": (out / shard_name).stat().st_size, "sha256": sha,
            "keys": [r[0] for r in rows], "exts": [r[1] for r in rows], "paths": [r[2] for r in rows],
            "labels": [r[3] for r in rows], "offsets": [s[0] for s in spans], "sizes": [s[1] for s in spans],
        })
    index = {"format": FORMAT, "version": VERSION, "split": name, "source": str(table.root), "classes": classes,
             "shards": shards, "total": {"images": len(order), "shards": len(shards),
                                         "bytes": sum(s["bytes"] for s in shards),
                                         "image_bytes": sum(sum(s["sizes"]) for s in shards)}}
    with open(out / "index.json", "w") as f:
        json.dump(index, f, separators=(",", ":"))
    return index


def write_shards(folder: str, out: str, shard_size: int = 1000, splits: list[str] | None = None,
                 overwrite: bool = False) -> dict[str, dict]:
    """Shard the image folder `folder` into `out` (see the module docstring); returns
    {split: index}. Checks everything it can before writing; writes under a temporary folder
    in `out` and renames each shard set into place only when all are written."""
    if shard_size < 1:
        raise ShardError(f"--shard-size={shard_size} must be >= 1")
    if not Path(folder).is_dir():
        raise ShardError(f"image folder '{folder}' is not a folder (expected <folder>/<class>/<image> or "
                         f"<folder>/train/<class>/<image>)")
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise ShardError(f"out dir '{out}' exists and is not a folder")
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        raise ShardError(f"out dir '{out}' is not empty ({', '.join(sorted(p.name for p in out_path.iterdir())[:5])}); "
                         f"choose an empty or new folder, or pass --overwrite to replace its shard sets")
    classes, folders = _split_folders(folder, splits)
    listed = {}
    for name, path in folders.items():
        table, labels = _list_split(path, classes)
        if len(table) == 0:
            raise ShardError(f"no images (.jpg, .jpeg, .png, ...) under '{path}/<class>/'")
        listed[name] = (table, labels)
    created = not out_path.exists()
    out_path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shards-tmp-", dir=out_path))
    try:
        indexes = {name: _write_split(name, table, labels, classes, tmp / name, shard_size)
                   for name, (table, labels) in listed.items()}
        for name in indexes:  # all written: swap them in (an old set moves aside first, then goes)
            final = out_path / name
            if final.exists() or final.is_symlink():
                os.replace(final, tmp / f".old-{name}")
            os.replace(tmp / name, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out_path, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return indexes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sslpipe.data.shard",
                                     description="Write WebDataset tar shards (+ index.json) of an image folder.")
    parser.add_argument("folder", help="<folder>/<class>/<image> or <folder>/train|val|test/<class>/<image>")
    parser.add_argument("out", help="output folder: <out>/<split>/shard-000000.tar ... and <out>/<split>/index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--split", action="append", choices=SPLIT_NAMES,
                        help="only this split folder (repeatable; default: every split folder found)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shard sets already in <out>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        indexes = write_shards(args.folder, args.out, args.shard_size, args.split, args.overwrite)
    except (ShardError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    images = sum(i["total"]["images"] for i in indexes.values())
    shards = sum(i["total"]["shards"] for i in indexes.values())
    size = sum(i["total"]["bytes"] for i in indexes.values())
    parts = ", ".join(f"{n} {i['total']['images']} images / {i['total']['shards']} shards" for n, i in indexes.items())
    print(f"sharded {images} images into {shards} shards, {size} bytes ({size / 1e6:.1f} MB), "
          f"in {time.perf_counter() - start:.2f} s -> {args.out} ({parts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
