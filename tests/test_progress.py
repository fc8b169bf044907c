"""The progress display: a redrawn line on a terminal, plain lines on a pipe, never both;
cheap enough to call every optimizer step. Checked on the Progress object and on the real
CLI under a pseudo-terminal (pty) and a pipe."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import time

import pytest

from sslpipe.progress import Progress
from sslpipe.results import write_results

TTY_LINE = "\r\x1b[2K"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class CountingLoss:
    """A loss whose value is read only when a line is drawn (on CUDA: a device sync)."""

    def __init__(self):
        self.reads = 0

    def __float__(self) -> float:
        self.reads += 1
        return 1.5


def test_terminal_redraws_in_place_at_most_ten_times_a_second():
    out, loss = FakeTTY(), CountingLoss()
    progress = Progress("pretrain", stream=out)
    assert progress.mode == "tty"
    total = 200_000
    started = time.perf_counter()
    for step in range(1, total + 1):
        progress.update(step, total, step / 1000, loss, 64)
    elapsed = time.perf_counter() - started
    text = out.getvalue()
    draws = text.count(TTY_LINE)
    # the first step, one per 0.1 s, and the last step
    assert 2 <= draws <= elapsed / 0.1 + 3, (draws, elapsed)
    assert loss.reads == draws  # the loss is never read back without being drawn
    assert elapsed / total < 20e-6, f"{elapsed / total * 1e6:.1f} us per step"  # negligible beside a training step
    assert "[progress]" not in text and text.endswith("\n")  # the last step ends the line
    last = text.rsplit(TTY_LINE, 1)[1]
    assert re.match(r"pretrain: step 200000/200000 \(100%\) epoch 200\.00 loss 1\.5000 \d+ img/s elapsed \d+:\d\d\n", last), last


def test_log_lines_off_a_terminal_every_interval():
    out = io.StringIO()
    progress = Progress("finetune", stream=out, log_interval_s=3600)
    assert progress.mode == "log"
    for step in range(1, 101):
        progress.update(step, 100, step / 10, 0.25, 32)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["1/100", "100/100"]  # first and last only
    assert lines[-1].startswith("[progress] finetune: step 100/100 (100%) epoch 10.00 loss 0.2500")


def test_mode_from_environment(monkeypatch):
    monkeypatch.setenv("SSLPIPE_PROGRESS", "off")
    out = FakeTTY()
    progress = Progress("x", stream=out)
    progress.update(1, 2, 0.0, 1.0, 1)
    progress.update(2, 2, 0.0, 1.0, 1)
    assert out.getvalue() == ""
    monkeypatch.setenv("SSLPIPE_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="SSLPIPE_PROGRESS='sometimes'.*tty, log, off"):
        Progress("x", stream=out)


def test_write_results(tmp_path):
    out = io.StringIO()
    path = write_results(tmp_path / "run", "results: x", "| a |\n|---|\n| 1 |", stream=out)
    assert path.read_text() == "# results: x\n\n| a |\n|---|\n| 1 |\n"
    assert "| 1 |" in out.getvalue() and str(path) in out.getvalue()


# ---------------------------------------------------------------- the real CLI, on a pty and on a pipe
RUN = ["stage.stages=[finetune]", "stage.baseline=[]", "stage.pretrain.loop.max_steps=12", "stage.pretrain.batch_size=64",
       "stage.finetune.loop.max_steps=4", "stage.finetune.loop.epochs=1", "hydra.run.dir=outputs/run"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SSLPIPE_PROGRESS")}
    return {**env, "OMP_NUM_THREADS": "2", "SSLPIPE_PROGRESS_S": "0", "TERM": "xterm"}


def _on_pty(args: list[str], cwd) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sslpipe", *args], cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=600), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_cli_on_a_terminal_draws_one_line_per_stage(tmp_path):
    code, text = _on_pty(RUN, tmp_path)
    assert code == 0, text[-3000:]
    for stage, total, note in (("pretrain simclr", 12, r" \| kNN 0\.\d+ std [\d.]+ rank [\d.]+"), ("finetune", 4, "")):
        assert f"{TTY_LINE}{stage}: step 1/{total} " in text
        # pretraining's line ends with the online kNN and collapse signals (sslpipe.monitor)
        assert re.search(rf"{re.escape(TTY_LINE)}{stage}: step {total}/{total} \(100%\) epoch [\d.]+ loss [\d.]+ "
                         rf"\d+ img/s elapsed \d+:\d\d{note}\r?\n", text), text[-3000:]
    assert "ETA " in text
    assert "[progress]" not in text  # never both
    assert (tmp_path / "outputs/run/results.md").read_text().count("| finetune | simclr |") == 1


@pytest.mark.slow
def test_cli_on_a_pipe_prints_plain_lines(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sslpipe", *RUN], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("[progress] ")]
    pre = [line for line in lines if line.startswith("[progress] pretrain simclr: step ")]
    fine = [line for line in lines if line.startswith("[progress] finetune: step ")]
    assert len(pre) == 12 and len(fine) == 4  # SSLPIPE_PROGRESS_S=0: a line per step
    assert re.fullmatch(r"\[progress\] pretrain simclr: step 5/12 \(42%\) epoch [\d.]+ loss \d+\.\d{4} \d+ img/s "
                        r"ETA \d+:\d\d", pre[4]), pre[4]
    assert "\r" not in out.stdout and "\x1b" not in out.stdout  # never both
    assert "results: simclr / smallcnn / digits" in out.stdout
