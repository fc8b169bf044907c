"""Run several sslpipe configs one after the other in one process (or in each rank of one
torchrun launch), so that a suite over every method pays the start-up of python, torch and
MLflow once instead of once per run.

    python tests/run_many.py <out dir> <jobs.json>
    python -m torch.distributed.run --nproc_per_node=2 tests/run_many.py <out dir> <jobs.json>

jobs.json: [{"name": "simclr", "overrides": ["method=simclr", ...]}, ...]. Each job runs through
`sslpipe.__main__.run` (the path the CLI takes) in <out dir>/<name>, tracking to <out dir>/mlflow.db.
`--kill-after-checkpoint N` runs each job in a forked child that SIGKILLs itself right after
the checkpoint of step N is written (a crash at the worst moment for resume); the parent,
which computes nothing itself, waits for each and moves on to the next (one process only)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    kill_at = None
    if argv[0] == "--kill-after-checkpoint":
        kill_at, argv = int(argv[1]), argv[2:]
    out, jobs = Path(argv[0]).resolve(), json.loads(Path(argv[1]).read_text())
    from sslpipe import distributed, engine
    from sslpipe.config import compose
    from sslpipe.__main__ import run

    if kill_at is not None:
        save = engine.Loop.save

        def save_then_die(self):
            save(self)
            if self.state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        engine.Loop.save = save_then_die
    tracking = [f"tracking.uri=sqlite:///{out}/mlflow.db", f"tracking.artifact_root={out}/mlartifacts"]
    for job in jobs:
        if kill_at is None:
            run(compose([*job["overrides"], *tracking]), folder=out / job["name"])
            continue
        child = os.fork()
        if child == 0:
            run(compose([*job["overrides"], *tracking]), folder=out / job["name"])
            os._exit(0)  # finished before step N: the caller sees exit status 0, not a kill
        _, status = os.waitpid(child, 0)
        print(json.dumps({"job": job["name"], "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL}),
              flush=True)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
