"""The MLflow UI, in a real (headless) Chromium, over a store that sslpipe filled with a
small sweep: the runs list shows both runs, the compare page shows their params side by
side and their headline metrics. Screenshots land in tests/artifacts/ (git-ignored).

Needs Debian's chromium (`.ci/run` installs it with apt) and playwright (the dev extra);
Playwright's own browser download is never used. Skipped when either is missing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "tests" / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
METHODS = ("simclr", "byol")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep of two pretrain runs, written by sslpipe itself."""
    missing = [] if Path(CHROMIUM).exists() else [f"{CHROMIUM} (apt-get install chromium fonts-liberation)"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing and os.environ.get("CI") == "true":  # CI installs both: a missing one must not pass as a skip
        pytest.fail(f"CI=true but {' and '.join(missing)} missing; .ci/run installs them")
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing; .ci/run installs them")
    cwd = tmp_path_factory.mktemp("browser")
    out = run_cli(["-m", "stage=pretrain", f"method={','.join(METHODS)}", "stage.pretrain.loop.epochs=1", "stage.pretrain.loop.max_steps=3",
                   "stage.pretrain.batch_size=64", "stage.pretrain.loop.log_every=1", "tracking.log_checkpoints=false"], cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "outputs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(store):
    """`mlflow server` on 127.0.0.1 in its own process group; stopped by that group."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(store / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                             "--default-artifact-root", str(store / "mlartifacts")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).read().strip() == b"OK":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(store / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker, nothing else
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _api(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


@pytest.fixture(scope="module")
def runs(server):
    exp = _api(server, "experiments/search", {"max_results": 10})["experiments"]
    exp_id = next(e["experiment_id"] for e in exp if e["name"] == "sslpipe")
    found = _api(server, "runs/search", {"experiment_ids": [exp_id], "max_results": 10})["runs"]
    assert len(found) == len(METHODS)
    return exp_id, found


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1600, "height": 2200})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        context.close()


# Texts of the leaf elements to the right of an element, on its row of the screen.
SAME_ROW = """(el) => {
  const r = el.getBoundingClientRect(), y = r.top + r.height / 2;
  return [...document.querySelectorAll('body *')].filter(e => {
    if (e.children.length || !e.textContent.trim()) return false;
    const b = e.getBoundingClientRect();
    return b.left > r.right && b.top <= y && b.bottom >= y && b.width > 0;
  }).map(e => e.textContent.trim());
}"""


def _tag(run: dict, key: str) -> str:
    return next(t["value"] for t in run["data"]["tags"] if t["key"] == key)


def _metric(run: dict, key: str) -> float:
    return next(m["value"] for m in run["data"]["metrics"] if m["key"] == key)


def _shot(page, name: str) -> Path:
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def test_runs_list_shows_the_sweep(server, runs, page):
    exp_id, found = runs
    page.goto(f"{server}/#/experiments/{exp_id}/runs")
    for run in found:
        page.get_by_role("link", name=run["info"]["run_name"], exact=True).first.wait_for()
    assert sorted(_tag(r, "sslpipe.method") for r in found) == sorted(METHODS)
    assert {r["info"]["run_name"] for r in found} == {f"pretrain-{m}-smallcnn-digits" for m in METHODS}
    assert _shot(page, "mlflow-runs-list.png").stat().st_size > 10_000


def test_compare_page_shows_params_and_metrics(server, runs, page):
    exp_id, found = runs
    ids = json.dumps([r["info"]["run_id"] for r in found])
    page.goto(f"{server}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(json.dumps([exp_id]))}")
    page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for()
    # params: a row per flattened config key, the two methods side by side
    row = page.locator("tr", has=page.get_by_text("method.name", exact=True)).first
    row.scroll_into_view_if_needed()
    cells = row.inner_text()
    assert all(m in cells for m in METHODS), cells
    for key in ("stage.pretrain.loop.max_steps", "backbone.name", "seed"):
        assert page.get_by_text(key, exact=True).count() >= 1, key
    # headline metrics: names as links, values rounded to 3 significant digits
    for key in ("train/loss", "train/lr", "train/images_per_s"):
        link = page.get_by_role("link", name=key, exact=True).first
        link.wait_for()
    link = page.get_by_role("link", name="train/loss", exact=True).first
    link.scroll_into_view_if_needed()
    shown = link.evaluate(SAME_ROW)  # names and values sit in two virtualised grids, aligned by row
    for run in found:  # the UI rounds to 3 significant digits or more
        value = _metric(run, "train/loss")
        assert any(abs(float(v) - value) <= 5e-3 * max(1.0, abs(value)) for v in shown), (value, shown)
    close = page.get_by_role("button", name="Close")
    if close.count():  # the "MLflow Assistant" side panel
        close.first.click()
    _shot(page, "mlflow-compare.png")
