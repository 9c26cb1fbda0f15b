"""End to end through the UIs, as a user drives them: `scratchllm ui` starts the Dagster webserver
and the MLflow server; a materialization of the whole graph is launched through Dagster's GraphQL
API (what the "Materialize all" button sends); it succeeds; the MLflow server then shows the
registered version with alias `champion`, and its chat fine-tune with the base as parent; headless
Chromium shows the loss curve on the trained_model page and its link opens the MLflow run; Ctrl-C
stops every server process.
The three tests share one UI and one run (module fixture) and run in this order."""

import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
import dagster as dg
from helpers import free_port, get_json, graphql, launch_assets, run_status, three_sources

from llm_core import tracking
from llm_core.config import PROJECT_ROOT
from pipelines.metadata import MLFLOW_UI_URL
from pipelines.ui import wait_until_up

pytestmark = pytest.mark.slow
RUN_TIMEOUT_SECONDS = 420
PAGE_TIMEOUT_SECONDS = 60


@dataclasses.dataclass
class UiRun:
    ui: subprocess.Popen
    servers: list  # psutil.Process of everything `scratchllm ui` started
    dagster_port: int
    mlflow_port: int
    run_id: str
    status: str | None  # the Dagster run's final status
    dagster_home: Path


def wait_for_run(port: int, run_id: str) -> str:
    """The Dagster run's final status (or its last one after RUN_TIMEOUT_SECONDS)."""
    deadline, status = time.monotonic() + RUN_TIMEOUT_SECONDS, None
    while time.monotonic() < deadline:
        status = run_status(port, run_id)
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(0.5)
    return status


@pytest.fixture(scope="module")
def ui_run(tmp_path_factory):
    """`scratchllm ui` on a tiny profile, with the whole graph launched through GraphQL and finished."""
    tmp_path = tmp_path_factory.mktemp("ui")
    profile = yaml.safe_load((PROJECT_ROOT / "assets_config" / "ci.yaml").read_text())
    profile["data_dir"] = str(tmp_path / "data")
    profile["training"].update(max_steps=10, checkpoint_interval=5, eval_interval=5)
    profile["sft"].update(max_steps=10, warmup_steps=2, eval_interval=5)
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(profile))
    dagster_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    ui = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--config", str(tmp_path / "profile.yaml"),
                           "--port", str(dagster_port), "--mlflow-port", str(mlflow_port)],
                          cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until_up(f"http://127.0.0.1:{mlflow_port}/health")
        assert wait_until_up(f"http://127.0.0.1:{dagster_port}/server_info")
        servers = psutil.Process(ui.pid).children(recursive=True)

        run_id = launch_assets(dagster_port, ["raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset",
                                              "trained_model", "model_evaluation", "registered_model", "hf_export",
                                              "sft_dataset", "chat_model"])

        status = wait_for_run(dagster_port, run_id)
        yield UiRun(ui, servers, dagster_port, mlflow_port, run_id, status, tmp_path / "dagster_home")
    finally:
        if ui.poll() is None:  # test_ctrl_c_stops_every_server did not run (or failed)
            ui.send_signal(signal.SIGINT)
            try:
                ui.wait(timeout=60)
            except subprocess.TimeoutExpired:
                ui.kill()
                ui.wait()


def test_ui_launches_the_whole_graph_through_graphql_and_mlflow_shows_the_champion(ui_run):
    assert ui_run.status == "SUCCESS"
    assert len(ui_run.servers) >= 3  # dagster dev (webserver, daemon, code server) and mlflow
    events = graphql(ui_run.dagster_port, f'{{ logsForRun(runId: "{ui_run.run_id}", limit: 5000) {{ ... on '
                                          f'EventConnection {{ events {{ ... on AssetCheckEvaluationEvent {{ '
                                          f'evaluation {{ checkName success }} }} }} }} }} }}')["logsForRun"]["events"]
    checks = [(e["evaluation"]["checkName"], e["evaluation"]["success"]) for e in events if e]
    assert sorted(checks) == sorted([
        ("raw_corpus_counts", True), ("cleaned_shards_invariant", True), ("tokenizer_roundtrip", True),
        ("token_ids_fit", True), ("token_accounting", True), ("no_eval_contamination", True),
        ("training_health", True), ("beats_champion", True), ("training_health", True)])  # the 2nd: chat_model's
    mlflow = f"http://127.0.0.1:{ui_run.mlflow_port}"
    champion = get_json(f"{mlflow}/api/2.0/mlflow/registered-models/alias?name=scratchllm&alias=champion")[
        "model_version"]
    tags = {t["key"]: t["value"] for t in champion["tags"]}
    assert champion["version"] == "1" and 0 < float(tags["val_bpb"]) < 16
    runs = get_json(f"{mlflow}/api/2.0/mlflow/runs/search", {"experiment_ids": ["1"], "max_results": 10})["runs"]
    assert any(r["info"]["run_id"] == champion["run_id"] for r in runs)
    chat = get_json(f"{mlflow}/api/2.0/mlflow/registered-models/alias?name=scratchllm-chat&alias=champion")[
        "model_version"]
    assert chat["version"] == "1" and {t["key"]: t["value"] for t in chat["tags"]}["scratchllm.parent"] == \
        "scratchllm/1"


CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class HeadlessChromium:
    """Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands on
    fd 3, replies on fd 4, each a JSON message ended by NUL): no port, no extra library."""

    def __init__(self, user_data_dir: Path, log: Path):
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        self.pid = os.posix_spawn(CHROMIUM, [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}",
                                             "--remote-debugging-pipe", "about:blank"], os.environ, setsid=True,
                                  file_actions=[(os.POSIX_SPAWN_DUP2, to_browser_r, 3),
                                                (os.POSIX_SPAWN_DUP2, from_browser_w, 4),
                                                (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT, 0o644),
                                                (os.POSIX_SPAWN_DUP2, 1, 2)])
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.last_id, self.received = 0, b""

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}, **({"sessionId": session}
                                                                                    if session else {})}
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.received:  # events arrive too: skip to our reply
                raw, self.received = self.received.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.last_id:
                    assert "error" not in reply, (method, reply["error"])
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} within {timeout} s")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise EOFError("chromium exited")
            self.received += chunk

    def open(self, url: str) -> str:
        """A new tab on `url`; returns its session id."""
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 1000, "deviceScaleFactor": 1,
                                                         "mobile": False}, session)
        return session

    def wait_for(self, session: str, expression: str, timeout: float = PAGE_TIMEOUT_SECONDS):
        """The value of a JavaScript expression once it is truthy (the page renders asynchronously)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                              session)["result"].get("value")
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"never true in the page: {expression}")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, TimeoutError, EOFError):
            pass
        deadline = time.monotonic() + 10
        while not os.waitpid(self.pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.1)
        os.close(self.to_browser)
        os.close(self.from_browser)


# The loss curve image once loaded (or failed); a long markdown value opens in a dialog: click it open.
LOSS_CURVE_IMAGE = """(() => {
  const img = [...document.images].find(i => i.alt === 'loss curve');
  if (img) return img.complete && {src: img.src.slice(0, 22), width: img.naturalWidth, height: img.naturalHeight};
  const row = [...document.querySelectorAll('tr')].find(r => r.innerText.startsWith('loss_curve_plot'));
  const show = row && [...row.querySelectorAll('a')].find(a => a.innerText === '[Show Markdown]');
  if (show) show.click();
  return null;
})()"""
MLFLOW_RUN_LINK = "[...document.querySelectorAll('a')].map(a => a.href).find(h => h.includes('#/experiments/'))"


@pytest.mark.skipif(CHROMIUM is None, reason="headless check needs Debian chromium (apt-get install -y chromium)")
def test_the_loss_curve_renders_on_the_asset_page_and_links_its_mlflow_run(ui_run, tmp_path):
    assert ui_run.status == "SUCCESS"
    graphql(ui_run.dagster_port, "mutation { setNuxSeen }")  # else a community modal covers the page
    browser = HeadlessChromium(tmp_path / "chromium_profile", tmp_path / "chromium.log")
    try:
        page = browser.open(f"http://127.0.0.1:{ui_run.dagster_port}/assets/trained_model")
        image = browser.wait_for(page, LOSS_CURVE_IMAGE)
        assert image["src"] == "data:image/png;base64," and image["width"] > 0 and image["height"] > 0, image

        link = browser.wait_for(page, MLFLOW_RUN_LINK)
        assert link.startswith(MLFLOW_UI_URL + "/#/experiments/")
        run_id = link.rsplit("/", 1)[1]
        run_name = get_json(f"http://127.0.0.1:{ui_run.mlflow_port}/api/2.0/mlflow/runs/get?run_id={run_id}")[
            "run"]["info"]["run_name"]
        # The link points at `scratchllm ui`'s default port; this test's MLflow UI is elsewhere.
        mlflow_page = browser.open(link.replace(MLFLOW_UI_URL, f"http://127.0.0.1:{ui_run.mlflow_port}"))
        browser.wait_for(mlflow_page, f"document.body.innerText.includes({json.dumps(run_name)})")
    finally:
        browser.close()


def test_a_mixture_sweep_from_the_ui_compares_per_source_scores(ui_run, tmp_path, prose):
    """Another profile's 2-mixture sweep launched in the same UI (the launchpad's resource config names the
    profile): two child runs under one parent, a per-source column each in the comparison, and the mixture
    that up-weights `docs` scores better on docs' validation documents."""
    profile = yaml.safe_load((PROJECT_ROOT / "assets_config" / "ci.yaml").read_text())
    profile.update(data_dir=str(tmp_path / "data"), corpus=three_sources(tmp_path / "sources", prose),
                   sweep={"name": "mixtures", "training.mixture": [{"plays": 1.0, "docs": 0.25},
                                                                   {"plays": 0.1, "docs": 1.0}]})
    profile["training"].update(max_steps=80, learning_rate=1e-2, mixture_max_repetitions=100, eval_interval=40,
                               checkpoint_interval=40)
    (tmp_path / "mixtures.yaml").write_text(yaml.safe_dump(profile))
    run_id = launch_assets(ui_run.dagster_port, ["raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset",
                                                 "trained_model", "model_evaluation"],
                           run_config={"resources": {"scratchllm": {"config": {
                               "profile": str(tmp_path / "mixtures.yaml"), "data_dir": str(tmp_path / "data")}}}})
    assert wait_for_run(ui_run.dagster_port, run_id) == "SUCCESS"

    with dg.DagsterInstance.from_config(str(ui_run.dagster_home)) as instance:
        metadata = instance.get_latest_materialization_event(dg.AssetKey("model_evaluation")).asset_materialization \
            .metadata
        raw = instance.get_latest_materialization_event(dg.AssetKey("raw_corpus")).asset_materialization.metadata
    assert set(raw["per_source_counts"].value) == {"plays", "docs", "tiny"}
    header, _, *rows = [[c.strip() for c in line.strip("|").split("|")]
                        for line in metadata["sweep_comparison"].value.splitlines()]
    assert {"plays bpb", "docs bpb"} <= set(header) and len(rows) == 2
    bpb = {row[0]: {s: float(row[header.index(f"{s} bpb")]) for s in ("plays", "docs")} for row in rows}
    assert bpb["v1"]["docs"] < bpb["v0"]["docs"] - 0.1 and bpb["v0"]["plays"] < bpb["v1"]["plays"]

    client = tracking.client(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}")
    parent = client.get_run(metadata["mlflow_parent_run_id"].value)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    assert {json.loads(c.data.tags["scratchllm.tokens_per_source"]).keys() == {"plays", "docs"} for c in children} \
        == {True}
    assert sorted(c.data.metrics["eval/docs/bpb"] for c in children) == pytest.approx(
        sorted(bpb[v]["docs"] for v in ("v0", "v1")), abs=1e-4)
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_comparison.md", "bpb_by_source.png"} <= artifacts


def test_ctrl_c_stops_every_server(ui_run):
    ui_run.ui.send_signal(signal.SIGINT)
    ui_run.ui.wait(timeout=60)
    assert ui_run.ui.returncode == 0
    _, alive = psutil.wait_procs(ui_run.servers, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
