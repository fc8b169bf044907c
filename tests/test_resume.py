"""Resume without SLURM: SIGKILL or SIGUSR2 mid-training, rerun in the same run folder, and
the run ends with the weights of an uninterrupted one in the same MLflow run with no metric
step twice. DDP on two gloo processes; eight writers on one SQLite store lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslpipe import checkpoint as ckpt

# 120 steps of 64 digits on a narrow CNN: ~6 s of training on one thread. A checkpoint every
# 40 steps and metrics flushed every 50 log calls, so a kill after a flush and before the next
# checkpoint would write steps 41..50 twice unless resume skips stored steps.
RUN = ["stage=pretrain", "stage.pretrain.loop.epochs=10", "stage.pretrain.loop.max_steps=120", "stage.pretrain.batch_size=64", "stage.pretrain.loop.checkpoint_every=40",
       "stage.pretrain.loop.log_every=1", "backbone.width=8", "backbone.num_features=32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the same float reductions in every run
ENV.pop("MLFLOW_TRACKING_URI", None)


def _cli(args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "sslpipe", *args], cwd=cwd, env=ENV, capture_output=True, text=True, **kw)


def _popen(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "sslpipe", *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _store(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd}/outputs/mlflow.db")


def _runs(cwd: Path):
    client = _store(cwd)
    experiment = client.get_experiment_by_name("sslpipe")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def _steps(client, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = ckpt.load(a / "checkpoints" / "final.pt"), ckpt.load(b / "checkpoints" / "final.pt")
    for part in ("encoder", "projector"):
        assert wa[part].keys() == wb[part].keys()
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), f"{part}.{k} differs"  # bitwise on CPU


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def uninterrupted(tmp_path_factory, args: list[str], name: str) -> Path:
    """Run `args` once, uninterrupted (seed 0, one thread); returns its run folder."""
    cwd = tmp_path_factory.mktemp(name)
    done = _cli([*args, "hydra.run.dir=outputs/reference"], cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "outputs" / "reference"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of RUN: its run folder."""
    return uninterrupted(tmp_path_factory, RUN, "reference")


@pytest.mark.slow
def test_sigkill_after_a_flush_resumes_into_the_same_run_without_duplicate_steps(tmp_path, reference):
    run_dir = tmp_path / "outputs" / "job"
    proc = _popen([*RUN, f"hydra.run.dir={run_dir}"], tmp_path)

    def flushed_past_checkpoint() -> bool:  # steps 41..50 stored, checkpoint still at 40
        try:
            client, runs = _runs(tmp_path)
            return bool(runs) and max(_steps(client, runs[0].info.run_id), default=0) >= 50
        except Exception:  # noqa: BLE001 - the store is being created
            return False

    assert _wait_for(flushed_past_checkpoint, proc), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    client, runs = _runs(tmp_path)
    first_id = runs[0].info.run_id

    done = _cli([*RUN, f"hydra.run.dir={run_dir}"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(tmp_path)
    assert [r.info.run_id for r in runs] == [first_id]          # the same MLflow run, continued
    assert runs[0].info.status == "FINISHED"
    for key in ("train/loss", "train/lr"):
        assert _steps(client, first_id, key) == list(range(1, 121)), key  # every step once
    assert_same_weights(reference, run_dir)


@pytest.mark.slow
def test_sigusr2_checkpoints_at_the_next_step_and_exits_then_resumes(tmp_path, reference):
    run_dir = tmp_path / "outputs" / "job"
    proc = _popen([*RUN, f"hydra.run.dir={run_dir}"], tmp_path)
    assert _wait_for(lambda: (run_dir / "checkpoints" / "last.pt").exists(), proc), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGUSR2)  # what SLURM sends ahead of the time limit
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, out[-3000:]
    stopped_at = ckpt.load(run_dir / "checkpoints" / "last.pt")["loop"]["step"]
    assert 40 < stopped_at < 120 and stopped_at % 40, "the signal's own checkpoint, not a periodic one"
    assert not (run_dir / "checkpoints" / "final.pt").exists()
    client, runs = _runs(tmp_path)
    assert _steps(client, runs[0].info.run_id) == list(range(1, stopped_at + 1))  # flushed up to the stop

    done = _cli([*RUN, f"hydra.run.dir={run_dir}"], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert _steps(client, runs[0].info.run_id) == list(range(1, 121))
    assert_same_weights(reference, run_dir)


# ---------------------------------------------------------------- a pipeline stopped in fine-tune
# pretrain (30 steps) -> knn -> fine-tune (60 steps, a checkpoint every 20) -> export, on digits
PIPELINE = ["stage=pipeline", "stage.stages=[knn,finetune,export]", "stage.baseline=[]", "backbone.width=8",
            "backbone.num_features=32", "stage.pretrain.loop.max_steps=30", "stage.pretrain.batch_size=64",
            "stage.finetune.loop.epochs=10", "stage.finetune.loop.max_steps=60", "stage.finetune.batch_size=64",
            "stage.finetune.loop.checkpoint_every=20", "stage.finetune.loop.log_every=1"]


def pipeline_runs(cwd: Path) -> tuple[object, object, dict[str, list]]:
    """The store's one pipeline parent run, and its children by stage."""
    client, runs = _runs(cwd)
    parents = [r for r in runs if r.data.tags["sslpipe.stage"] == "pipeline"]
    assert len(parents) == 1, [r.data.tags["sslpipe.stage"] for r in runs]  # one parent across attempts
    children: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id:
            children.setdefault(r.data.tags["sslpipe.stage"], []).append(r)
    return client, parents[0], children


def assert_resumed_pipeline_matches(cwd: Path, run_dir: Path, reference: Path) -> None:
    """One FINISHED parent, each child once and FINISHED, fine-tune's steps each logged once,
    and fine-tune's weights bitwise those of the uninterrupted pipeline."""
    client, parent, children = pipeline_runs(cwd)
    assert parent.info.status == "FINISHED"
    assert {k: len(v) for k, v in children.items()} == {"pretrain": 1, "knn": 1, "finetune": 1, "export": 1}
    assert all(r.info.status == "FINISHED" for rs in children.values() for r in rs)
    assert _steps(client, children["finetune"][0].info.run_id) == list(range(1, 61))
    got = ckpt.load(run_dir / "finetune" / "checkpoints" / "last.pt")["model"]
    want = ckpt.load(reference / "finetune" / "checkpoints" / "last.pt")["model"]
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"fine-tune {k} differs"


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory):
    """An uninterrupted PIPELINE: its run folder."""
    return uninterrupted(tmp_path_factory, PIPELINE, "pipeline-reference")


@pytest.mark.slow
def test_pipeline_stopped_in_finetune_resumes_into_one_parent_run(tmp_path, pipeline_reference):
    run_dir = tmp_path / "outputs" / "job"
    proc = _popen([*PIPELINE, f"hydra.run.dir={run_dir}"], tmp_path)
    in_finetune = run_dir / "finetune" / "checkpoints" / "last.pt"
    assert _wait_for(in_finetune.exists, proc, timeout=300), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, out[-3000:]
    stopped_at = ckpt.load(in_finetune)["loop"]["step"]
    assert 20 <= stopped_at < 60, stopped_at
    journal = json.loads((run_dir / "pipeline.json").read_text())
    assert sorted(journal["steps"]) == ["knn", "pretrain"]          # finished steps, not the stopped one
    _, parent, children = pipeline_runs(tmp_path)
    assert parent.info.status == "KILLED" and children["finetune"][0].info.status == "KILLED"

    done = _cli([*PIPELINE, f"hydra.run.dir={run_dir}"], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| finetune |" in done.stdout
    assert f"resumed from {in_finetune}" in (run_dir / "sslpipe.log").read_text()
    assert_resumed_pipeline_matches(tmp_path, run_dir, pipeline_reference)


# ---------------------------------------------------------------- DDP on two gloo processes
def _ddp_train(rank: int) -> dict:
    """Three DDP steps on different data per rank; the weights after them. The wrapper goes out
    of scope here, before `distributed.teardown` frees the process group it holds."""
    from sslpipe import distributed

    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    class Step(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x).pow(2).mean()

    ddp = distributed.wrap(Step(model), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        x = torch.full((5, 4), float(rank + i))  # different data per rank
        opt.zero_grad()
        ddp(x).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sslpipe import distributed
    from sslpipe.data.split import Split

    distributed.setup(torch.device("cpu"))
    weights = _ddp_train(rank)
    assert distributed.any_rank(rank == 1) is True
    feats = distributed.all_gather_cat(torch.full((rank + 1, 2), float(rank)))  # uneven shards
    split = Split(torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1), torch.arange(7))
    bank = distributed.extract_features_sharded(lambda s: s.images.float().view(-1, 1) * 10, split)
    torch.save({"weights": weights, "feats": feats, "bank": bank}, f"{out}/rank{rank}.pt")
    distributed.teardown()


def test_ddp_two_gloo_ranks_agree_and_gather(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k  # same start, averaged gradients
    assert torch.equal(r0["feats"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(r0["bank"], torch.arange(7).float().view(-1, 1) * 10)  # whole split, original order
    assert torch.equal(r1["bank"], r0["bank"])


def _exit_hook_worker(rank: int, port: int, out: str) -> None:
    import atexit

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sslpipe import distributed

    distributed.setup(torch.device("cpu"))
    gathered = distributed.all_gather_cat(torch.full((1, 2), float(rank)))
    before = dist.is_initialized()
    atexit._run_exitfuncs()  # what the interpreter runs first at exit, before finalisation
    torch.save({"gathered": gathered, "before": before, "after": dist.is_initialized()}, f"{out}/rank{rank}.pt")


def test_a_rank_that_never_tears_down_leaves_the_gloo_group_at_exit(tmp_path):
    """An error or a requeue exit skips `teardown`: the exit hook `setup` registered frees the
    group before the interpreter finalises (see distributed.teardown for the crash otherwise)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_exit_hook_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(got["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        assert got["before"] is True and got["after"] is False


def test_a_sweep_under_torchrun_joins_the_group_once_and_leaves_it_at_the_end(tmp_path):
    """Two ranks run a two-job sweep in one torchrun launch: they join the process group once,
    keep it for the second job, and leave it once, after the last."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "-m", "sslpipe", "-m", "stage=pretrain", "device=cpu", "stage.pretrain.loop.max_steps=2",
                           "stage.pretrain.batch_size=8", "backbone.width=8", "backbone.num_features=32", "seed=0,1",
                           "hydra.sweep.dir=multirun/sweep"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for r in (0, 1):
        assert out.count(f"joined process group: backend gloo, rank {r} of 2") == 1, out[-3000:]
        assert out.count(f"rank {r} left the process group") == 1, out[-3000:]
    assert out.count("pretrain simclr on digits") == 2, out[-3000:]  # each job's summary, from rank 0 only
    for job in (0, 1):
        assert (tmp_path / "multirun" / "sweep" / str(job) / "checkpoints" / "final.pt").exists()


# ---------------------------------------------------------------- many writers, one store
WRITER = r"""
import sys
from sslpipe.tracking import Tracker
uri, name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
run = Tracker(uri, "sslpipe").start_run(name, {"sslpipe.stage": "pretrain"})
run.flush_every = 1                      # a write per step: as much contention as possible
for step in range(1, steps + 1):
    run.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1, "train/images_per_s": 100.0 + step}, step)
run.end()
print(run.id)
"""


@pytest.mark.slow
def test_eight_concurrent_writers_lose_no_metric_step(tmp_path):
    uri, steps = f"sqlite:///{tmp_path}/outputs/mlflow.db", 150  # a fresh store: its creation races too
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, f"writer-{i}", str(steps)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    outs = [p.communicate(timeout=280) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])
    assert len(runs) == 8
    for r in runs:
        for key in ("train/loss", "train/lr", "train/images_per_s"):
            assert _steps(client, r.info.run_id, key) == list(range(1, steps + 1)), (r.info.run_name, key)
    assert not list((tmp_path / "outputs").glob("unwritten/*"))  # nothing had to be spilled


def test_an_unavailable_store_never_stops_training_and_spills_what_it_could_not_write(tmp_path, monkeypatch):
    from sslpipe import tracking

    class DownClient:
        def log_batch(self, *a, **kw):
            raise ConnectionError("store down")

        def set_terminated(self, *a, **kw):
            pass

    monkeypatch.setattr(tracking, "RETRY_BUDGET_S", 0.2)
    run = tracking.Run(DownClient(), "abc123", flush_every=2, spill_dir=tmp_path)
    for step in range(1, 6):
        run.log_metrics({"train/loss": float(step)}, step)  # flushes fail quietly, values stay buffered
    run.end()  # the final flush fails too: spilled to a file, named in the log
    spilled = tmp_path / "unwritten-metrics-abc123.jsonl"
    assert len(spilled.read_text().splitlines()) == 5

    store = tmp_path / "store"
    tracker = tracking.Tracker(f"sqlite:///{store}/mlflow.db", "sslpipe")
    real = tracker.start_run("replayed", {})
    spilled.write_text(spilled.read_text().replace("abc123", real.id))
    assert tracking.replay(spilled, tracker.uri) == 5
    assert _steps(tracker.client, real.id) == [1, 2, 3, 4, 5]


def test_replay_defaults_to_the_projects_store(tmp_path):
    """`python -m sslpipe.tracking replay <file>` with no URI writes into outputs/mlflow.db of
    the folder it runs in (where `python -m sslpipe` writes), not MLflow's own default."""
    import json

    from sslpipe import tracking

    tracker = tracking.Tracker(f"sqlite:///{tmp_path}/outputs/mlflow.db", "sslpipe")
    real = tracker.start_run("replayed", {})
    rows = [{"run_id": real.id, "key": "train/loss", "value": 1.0 / s, "timestamp": 0, "step": s} for s in (1, 2, 3)]
    (tmp_path / "spilled.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "sslpipe.tracking", "replay", "spilled.jsonl"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "outputs/mlflow.db" in done.stdout, done.stderr[-2000:]
    assert _steps(tracker.client, real.id) == [1, 2, 3]
    assert not (tmp_path / "mlruns").exists()  # MLflow's own default store stayed untouched
    missing = subprocess.run([sys.executable, "-m", "sslpipe.tracking", "replay", "nope.jsonl"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "nope.jsonl" in missing.stderr


# ---------------------------------------------------------------- every method, killed and resumed
METHODS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "method").glob("*.yaml"))
STEPS = ["stage=pretrain", "device=cpu", "stage.pretrain.loop.epochs=3", "stage.pretrain.loop.max_steps=8", "stage.pretrain.batch_size=32",
         "stage.pretrain.loop.checkpoint_every=4", "stage.pretrain.loop.log_every=1", "tracking.log_checkpoints=false"]


def _method_jobs() -> list[dict]:
    """Each method with its yaml's augmentation, masks and queue (nothing made deterministic):
    8 steps over 3 short epochs, so the kill at step 4 lands mid-epoch (digits: 1257 / 32)."""
    jobs = []
    for method in METHODS:
        backbone = ["backbone=vit_tiny", "+backbone.depth=2"] if method in ("mae", "ibot") else \
                   ["backbone.width=8", "backbone.num_features=32"]
        extra = ["method.samples_per_class=4"] if method == "simo2" else []
        jobs.append({"name": method, "overrides": [f"method={method}", *backbone, *STEPS, *extra]})
    return jobs


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """One uninterrupted run per method, and per method a run SIGKILLed right after its step-4
    checkpoint and then resumed in the same folder (tests/run_many.py)."""
    import json

    root = tmp_path_factory.mktemp("methods")
    runner = str(Path(__file__).resolve().parent / "run_many.py")
    for name, kill in (("reference", False), ("job", True)):
        (root / name).mkdir()
        (root / name / "jobs.json").write_text(json.dumps(_method_jobs()))
        args = [sys.executable, runner, *(["--kill-after-checkpoint", "4"] if kill else []), str(root / name),
                str(root / name / "jobs.json")]
        done = subprocess.run(args, cwd=root / name, env=ENV, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        if kill:
            reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"job"')]
            assert [r["job"] for r in reports if r["killed"]] == METHODS, done.stdout[-3000:]
            for method in METHODS:
                assert ckpt.load(root / name / method / "checkpoints" / "last.pt")["loop"]["step"] == 4
                assert not (root / name / method / "checkpoints" / "final.pt").exists()
            resumed = subprocess.run(args[:2] + args[4:], cwd=root / name, env=ENV, capture_output=True, text=True,
                                     timeout=1200)
            assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_resumes_bitwise_after_sigkill(killed_and_resumed, method):
    reference = killed_and_resumed / "reference" / method
    resumed = killed_and_resumed / "job" / method
    assert ckpt.load(resumed / "checkpoints" / "last.pt")["loop"]["step"] == 8
    assert_same_weights(reference, resumed)
    # the method's own state too: MoCo's queue, DINO / iBOT centres, the mask streams
    a, b = (ckpt.load(p / "checkpoints" / "last.pt")["model"] for p in (reference, resumed))
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert str(a[key]) == str(b[key]), key
