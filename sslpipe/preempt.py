"""Preemption and time-out: SIGUSR2 / SIGTERM save a checkpoint at the next step boundary,
then hand over to whoever can requeue the job.

SLURM sends SIGUSR2 ahead of the time limit (`--signal=USR2@<s>`; submitit asks for it via
`signal_delay_s`) and SIGTERM on preemption or scancel. The handler only records the
signal: the training loop asks `requested()` between optimizer steps (all ranks agree, one
tiny all-reduce), saves, and raises `engine.Preempted`; `StopSignal.hand_over()` then
- under Hydra's submitit launcher, calls submitit's own SIGUSR2 handler: it pickles the
  launcher's `checkpoint()` (the same job, same sweep folder) and runs `scontrol requeue`;
- under plain sbatch (`--requeue`), runs `scontrol requeue $SLURM_JOB_ID` itself on SIGUSR2;
  the requeued job keeps its job id, hence its run folder (slurm/*.sbatch), and resumes;
- elsewhere, or on SIGTERM, exits with 128 + signal number after the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from sslpipe import distributed

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopSignal:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignal":
        for sig in SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._record)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            log.warning("caught %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.signum = signum

    def requested(self) -> bool:
        return distributed.any_rank(self.signum is not None)

    def hand_over(self) -> None:
        """After the checkpoint: let the launcher requeue the job, then leave. Never returns."""
        signum = self.signum or signal.SIGUSR2  # another rank got it: act as on SIGUSR2
        previous = self._previous.get(signum)
        self.restore()
        if signum == signal.SIGUSR2 and callable(previous) and "submitit" in getattr(previous, "__module__", ""):
            previous(signum, None)  # submitit: checkpoint() + scontrol requeue + sys.exit on rank 0
        elif signum == signal.SIGUSR2 and os.environ.get("SLURM_JOB_ID") and distributed.is_main():
            job = os.environ["SLURM_JOB_ID"]
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                log.warning("requeued SLURM job %s; it resumes from its run folder", job)
            else:
                log.error("scontrol requeue %s failed (submit with --requeue): %s", job, done.stderr.strip())
        sys.exit(128 + int(signum))
