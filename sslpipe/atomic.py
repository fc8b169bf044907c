"""The one atomic write of the project: checkpoints, export tensor files, the pipeline journal.

`write(tmp)` fills a temp file in the target's folder; it is fsynced and renamed over the
target, so a crash or SIGKILL leaves the old file or the new one, never a torn one (rename is
atomic within a file system, POSIX). Temp files of the same target that a killed earlier
process left behind (SIGKILL runs no cleanup) are removed once the new file is in place; one
process writes a given path, so none of them is still being written."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    return path
