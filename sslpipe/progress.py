"""What a user sees while a stage trains and when it ends.

`Progress` shows step, epoch, loss, images/s and ETA: on a terminal one line redrawn in
place (at most `tty_interval_s` apart, 10 per second by default), elsewhere (a pipe, a SLURM
log file) a plain line every `log_interval_s` seconds (`SSLPIPE_PROGRESS_S`, 30 s by default)
plus the first and the last step. Never both. `SSLPIPE_PROGRESS=tty|log|off` forces a mode.

The training loop calls `update` once per optimizer step. The call costs one clock read
and a few additions; the loss (a device tensor) is read back only when a line is drawn,
so on CUDA the host waits for the device at most as often as the display refreshes.
The table at the end of a run is sslpipe.results."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

MODES = ("auto", "tty", "log", "off")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:d}:{rest % 60:02d}"


class _ClearLine(logging.Filter):
    """Attached to logging handlers that write to the same terminal as the progress line:
    clears the line before a log record is written, so the record starts at column 0."""

    def __init__(self, progress: "Progress"):
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


class Progress:
    """A per-stage progress display; `update(...)` every optimizer step, `close()` at the end
    (also on errors: it ends the terminal line). The last step closes it by itself."""

    def __init__(self, name: str, stream: TextIO | None = None, mode: str | None = None,
                 tty_interval_s: float = 0.1, log_interval_s: float | None = None):
        self.name, self.stream = name, stream if stream is not None else sys.stdout
        mode = mode or os.environ.get("SSLPIPE_PROGRESS", "auto")
        if mode not in MODES:
            raise ValueError(f"SSLPIPE_PROGRESS='{mode}' is not one of: {', '.join(MODES)}")
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "tty" if isatty is not None and isatty() else "log"
        self.mode = mode
        if log_interval_s is None:
            log_interval_s = float(os.environ.get("SSLPIPE_PROGRESS_S", "30"))
        self.interval = tty_interval_s if mode == "tty" else log_interval_s
        self._t0 = self._t_last = None
        self._step0 = 0
        self._images = 0        # since the last drawn line
        self._rate = None       # images/s, smoothed on a terminal
        self._drawn = False     # a terminal line is showing
        self._closed = mode == "off"
        self.note = ""          # appended to every line, e.g. the online kNN (sslpipe.monitor)
        self._last: tuple | None = None
        self._filters: list[tuple[logging.Handler, _ClearLine]] = []
        if mode == "tty":
            self._guard_logging()

    # ------------------------------------------------------------ the per-step hook
    def update(self, step: int, total: int, epoch: float, loss, images: int) -> None:
        """`step` optimizer steps of `total` done; `loss` a float or a 0-d tensor (read only
        when drawn); `images` seen in this step."""
        if self._closed:
            return
        now = time.monotonic()
        if self._t0 is None:  # the first step of this process (a resumed run starts mid-way)
            self._t0 = self._t_last = now
            self._step0 = step - 1
        self._images += images
        self._last = (step, total, epoch, loss)
        first = step == self._step0 + 1
        if step >= total:
            self._draw(now)
            self.close()
        elif first or now - self._t_last >= self.interval:
            self._draw(now)

    def _draw(self, now: float) -> None:
        step, total, epoch, loss = self._last
        dt = now - self._t_last
        if dt > 0:
            rate = self._images / dt
            self._rate = rate if self._rate is None or self.mode == "log" else 0.7 * self._rate + 0.3 * rate
        self._t_last, self._images = now, 0
        done = step - self._step0
        eta = (now - self._t0) / done * (total - step) if done > 0 and now > self._t0 else None
        text = (f"{self.name}: step {step}/{total} ({100 * step / max(total, 1):.0f}%) epoch {epoch:.2f} "
                f"loss {float(loss):.4f} " + (f"{self._rate:.0f} img/s " if self._rate is not None else "")
                + (f"ETA {_duration(eta)}" if eta is not None and step < total else f"elapsed {_duration(now - self._t0)}")
                + (f" | {self.note}" if self.note else ""))
        if self.mode == "tty":
            self.stream.write("\r\x1b[2K" + text)
            self._drawn = True
        else:
            self.stream.write(f"[progress] {text}\n")
        self.stream.flush()

    # ------------------------------------------------------------ terminal housekeeping
    def clear(self) -> None:
        """Erase the terminal line (before something else is printed); redrawn next update."""
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handler, filt in self._filters:
            handler.removeFilter(filt)
        if self._drawn:  # keep the last line, end it
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _guard_logging(self) -> None:
        """Log records written to our terminal (Hydra's console handler) clear the line first."""
        try:
            ours = os.path.sameopenfile
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            try:
                same = stream is not None and ours(stream.fileno(), fd)
            except (AttributeError, OSError, ValueError):
                same = False
            if same:
                filt = _ClearLine(self)
                handler.addFilter(filt)
                self._filters.append((handler, filt))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
