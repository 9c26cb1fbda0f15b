"""End to end through the UIs, as a user drives them: `scratchllm ui` starts the Dagster webserver
and the MLflow server; a materialization of the whole graph is launched through Dagster's GraphQL
API (what the "Materialize all" button sends); it succeeds; the MLflow server then shows the
registered version with alias `champion`; Ctrl-C stops every server process."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import yaml
from helpers import free_port

from llm_core.config import PROJECT_ROOT
from pipelines.ui import wait_until_up

pytestmark = pytest.mark.slow
RUN_TIMEOUT_SECONDS = 420


def get_json(url: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = get_json(f"http://127.0.0.1:{port}/graphql", {"query": query, "variables": variables or {}})
    assert "errors" not in body, body
    return body["data"]


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def test_ui_launches_the_whole_graph_through_graphql_and_mlflow_shows_the_champion(tmp_path):
    profile = yaml.safe_load((PROJECT_ROOT / "assets_config" / "ci.yaml").read_text())
    profile["data_dir"] = str(tmp_path / "data")
    profile["training"].update(max_steps=10, checkpoint_interval=5, eval_interval=5)
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
        assert len(servers) >= 3  # dagster dev (webserver, daemon, code server) and mlflow

        repository = graphql(dagster_port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
                                           "location { name } } } } }")["repositoriesOrError"]["nodes"][0]
        assets = ["raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset", "trained_model",
                  "model_evaluation", "registered_model", "hf_export"]
        # As the UI's "Materialize all": an asset selection, no assetCheckSelection (PITFALLS: an
        # empty list would skip the checks).
        launched = graphql(dagster_port, LAUNCH, {"params": {
            "selector": {"repositoryLocationName": repository["location"]["name"],
                         "repositoryName": repository["name"], "pipelineName": "__ASSET_JOB",
                         "assetSelection": [{"path": [a]} for a in assets]},
            "runConfigData": {}, "mode": "default"}})["launchPipelineExecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        deadline, status = time.monotonic() + RUN_TIMEOUT_SECONDS, None
        while time.monotonic() < deadline:
            status = graphql(dagster_port, f'{{ runOrError(runId: "{run_id}") {{ ... on Run {{ status }} }} }}')[
                "runOrError"]["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(2)
        assert status == "SUCCESS"

        events = graphql(dagster_port, f'{{ logsForRun(runId: "{run_id}", limit: 5000) {{ ... on EventConnection {{ '
                                       f'events {{ ... on AssetCheckEvaluationEvent {{ evaluation {{ checkName '
                                       f'success }} }} }} }} }} }}')["logsForRun"]["events"]
        checks = {e["evaluation"]["checkName"]: e["evaluation"]["success"] for e in events if e}
        assert checks == {"raw_corpus_counts": True, "cleaned_shards_invariant": True, "tokenizer_roundtrip": True,
                          "token_ids_fit": True, "token_accounting": True, "training_health": True,
                          "beats_champion": True}
        champion = get_json(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/registered-models/alias"
                            f"?name=scratchllm&alias=champion")["model_version"]
        tags = {t["key"]: t["value"] for t in champion["tags"]}
        assert champion["version"] == "1" and 0 < float(tags["val_bpb"]) < 16
        runs = get_json(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": ["1"], "max_results": 10})["runs"]
        assert any(r["info"]["run_id"] == champion["run_id"] for r in runs)
    finally:
        ui.send_signal(signal.SIGINT)
        try:
            ui.wait(timeout=60)
        finally:
            if ui.poll() is None:
                ui.kill()
    assert ui.returncode == 0
    _, alive = psutil.wait_procs(servers, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
