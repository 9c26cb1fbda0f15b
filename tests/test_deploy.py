"""A team deployment (`scratchllm deploy`, pipelines/deploy.py) on the real PostgreSQL server of this
machine: the webserver, the daemon, the code server and an MLflow tracking server with basic auth,
started from another working directory as a user does, with a database of their own for this module
(dropped at the end). Each user path goes through the deployed servers: GraphQL launches queued and run
by the daemon, MLflow through its REST API and its artifact proxy, `scratchllm generate` with nothing
but the tracking URI and credentials. Skipped, saying why, where no PostgreSQL answers."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml
from helpers import free_port, graphql, launch_assets, run_status, wait_until

from llm_core.config import PROJECT_ROOT, ConfigError, load_config

pytestmark = pytest.mark.slow
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
CLI = [sys.executable, "-m", "pipelines.cli"]
ALL_ASSETS = ["raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset", "trained_model", "model_evaluation",
              "registered_model", "hf_export"]
SHAKESPEARE = (PROJECT_ROOT / "data" / "tinyshakespeare.txt").read_text()


def postgres_or_skip():
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        return psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no PostgreSQL answers at {PG['host']}:{PG['port']} as {PG['user']} ({str(exc).strip()}); "
                    f"`.ci/run` starts one from Debian's postgresql package")


def sql(database: str, statement: str, *params) -> list[tuple]:
    import psycopg2

    connection = psycopg2.connect(dbname=database, **PG)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def user_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A newcomer's shell: no MLflow, Dagster, PostgreSQL or scratchllm settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SCRATCHLLM_", "DAGSTER_", "PG"))}
    return {**env, "HOME": str(tmp), **extra}


def deploy(*args: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*CLI, "deploy", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


class Deployment:
    def __init__(self, root: Path):
        self.root, self.home, self.artifacts = root, root / "home", root / "artifacts"
        self.database = f"scratchllm_test_{secrets.token_hex(4)}"
        self.pg_password = f"pg-Secret-{secrets.token_hex(6)}"  # trust auth here: given, never needed
        self.admin_password = f"admin-Secret-{secrets.token_hex(6)}"
        self.ports = {"dagster": free_port(), "mlflow": free_port(), "code": free_port()}
        self.held = root / "held"  # a training that reaches step 50 (only the fault test's do) holds there
        self.mlflow = f"http://127.0.0.1:{self.ports['mlflow']}"
        self.profile = root / "team.yaml"
        self.corpus = corpus = root / "corpus"
        corpus.mkdir()
        for i in range(3):
            (corpus / f"play_{i}.txt").write_text(SHAKESPEARE[i * 40_000:(i + 1) * 40_000])
        self.profile.write_text(yaml.safe_dump({
            "data_dir": str(root / "data"),
            "corpus": {"sources": [str(corpus)], "max_document_bytes": 2048, "pieces_are_documents": [str(corpus)]},
            "cleaning": {"num_workers": 1}, "tokenizer": {"vocab_size": 300},
            "dataset": {"val_fraction": 0.2, "builtin_task_items": 20},
            "model": {"n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "block_size": 32},
            "training": {"peak_flops": 1e12, "max_steps": 8, "warmup_steps": 2, "batch_size": 4, "eval_interval": 4,
                         "checkpoint_interval": 4, "eval_batches": 2},
            "evaluation": {"max_new_tokens": 8, "max_val_tokens": 5000},
            "sft": {"sources": []},  # no conversations, no chat fine-tune (~17 s a graph; tested in test_ui.py)
            # off until a test turns them on, as a user does in the UI
            "automation": {"retrain_cron": "* * * * *", "new_data_interval_seconds": 30}}))

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{self.pg_password}@127.0.0.1:5432/{self.database}"

    def up(self) -> subprocess.CompletedProcess:
        return deploy("up", "--database", self.url, "--artifacts", str(self.artifacts), "--home", str(self.home),
                      "--config", str(self.profile), "--dagster-port", str(self.ports["dagster"]),
                      "--mlflow-port", str(self.ports["mlflow"]), "--code-port", str(self.ports["code"]),
                      "--max-concurrent-runs", "1",
                      env=user_env(self.root, SCRATCHLLM_ADMIN_PASSWORD=self.admin_password,
                                   SCRATCHLLM_HOLD_AT="step:50", SCRATCHLLM_HOLD_MARKER=str(self.held)),
                      cwd=self.root / "ops")

    def rest(self, path: str, payload: dict | None = None, user: tuple[str, str] | None = None,
             method: str | None = None) -> tuple[int, dict]:
        """A request to the MLflow server's REST API, as `user` (None: no credentials)."""
        request = urllib.request.Request(f"{self.mlflow}/api/2.0/mlflow/{path}",
                                         data=json.dumps(payload).encode() if payload is not None else None,
                                         headers={"Content-Type": "application/json"}, method=method)
        if user:
            request.add_header("Authorization", "Basic " + b64encode(f"{user[0]}:{user[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, {}

    @property
    def admin(self) -> tuple[str, str]:
        return "admin", self.admin_password


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    postgres_or_skip().close()
    deployment = Deployment(tmp_path_factory.mktemp("team"))
    started = deployment.up()
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield deployment
    finally:
        deploy("stop", "--home", str(deployment.home), env=user_env(deployment.root), cwd=deployment.root)
        for name in (deployment.database, f"{deployment.database}_mlflow", f"{deployment.database}_mlflow_auth"):
            sql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def whole_graph(team):
    """The whole graph launched through the deployed webserver, as the UI's "Materialize all" does."""
    port = team.ports["dagster"]
    run_id = launch_assets(port, ALL_ASSETS)
    wait_until(lambda: run_status(port, run_id) in ("SUCCESS", "FAILURE", "CANCELED"), what="the end of the run",
               timeout=400)
    return run_id


def test_the_whole_graph_is_queued_run_by_the_daemon_and_registered_behind_the_proxy(team, whole_graph, tmp_path):
    assert run_status(team.ports["dagster"], whole_graph) == "SUCCESS"
    assert sql(team.database, "SELECT status FROM runs WHERE run_id = %s", whole_graph) == [("SUCCESS",)]
    kinds = [k for (k,) in sql(team.database, "SELECT dagster_event_type FROM event_logs WHERE run_id = %s "
                                              "AND dagster_event_type IS NOT NULL ORDER BY id", whole_graph)]
    queued = ["PIPELINE_ENQUEUED", "PIPELINE_STARTING", "PIPELINE_START", "PIPELINE_SUCCESS"]  # the daemon started it
    assert [k for k in kinds if k in queued] == queued, kinds

    # The registry in PostgreSQL, the model's files behind the server's artifact proxy.
    status, found = team.rest("registered-models/alias?name=scratchllm&alias=champion", user=team.admin)
    assert status == 200, found
    version = found["model_version"]
    status, training = team.rest(f"runs/get?run_id={version['run_id']}", user=team.admin)
    assert training["run"]["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    assert sql(f"{team.database}_mlflow", "SELECT count(*) FROM model_versions WHERE name = 'scratchllm'") == [(1,)]
    assert any(p.name == "model.safetensors" for p in team.artifacts.rglob("*"))

    # generate from another directory with only the tracking URI and credentials.
    env = user_env(tmp_path, MLFLOW_TRACKING_URI=team.mlflow, MLFLOW_TRACKING_USERNAME="admin",
                   MLFLOW_TRACKING_PASSWORD=team.admin_password)
    done = subprocess.run([*CLI, "generate", "--model", "scratchllm@champion", "--prompt", "ROMEO:",
                           "--max-new-tokens", "8"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ROMEO:") and len(done.stdout.strip()) > len("ROMEO:")
    exported = subprocess.run([*CLI, "export-hf", "--model", "scratchllm@champion", "--out", str(tmp_path / "hf")],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0 and (tmp_path / "hf" / "model.safetensors").exists(), exported.stderr[-3000:]
    assert not list(tmp_path.glob("mlruns")) and not list(tmp_path.glob("mlflow.db"))
    # Downloaded once into the download cache of the profile in force (the default's: the project's data/run),
    # under this deployment's run id; removed so that the checkout keeps nothing of the test.
    cache = PROJECT_ROOT / "data" / "run" / "registry_cache" / "scratchllm"
    cached = cache / f"{version['version']}-{version['run_id']}"
    assert (cached / "artifacts" / "model" / "model.safetensors").is_file()
    shutil.rmtree(cached)
    for folder in (cache, cache.parent, cache.parent.parent):  # and the folders it made, where now empty
        if any(folder.iterdir()):
            break
        folder.rmdir()


def test_scratchllm_run_uses_the_deployment_and_warm_starts_through_the_server(team, whole_graph, tmp_path):
    """A user's shell: DAGSTER_HOME at the deployment, a profile naming the tracking server (and the
    champion to start from), credentials in the environment; the run is in the PostgreSQL instance."""
    profile = yaml.safe_load(team.profile.read_text())
    profile["tracking"] = {"uri": team.mlflow}
    profile["training"] |= {"init_from": "scratchllm@champion", "seed": 7}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(profile))
    env = user_env(tmp_path, DAGSTER_HOME=str(team.home), PGPASSWORD=team.pg_password,
                   MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=team.admin_password)
    done = subprocess.run([*CLI, "run", "--config", "mine.yaml", "--select", "trained_model"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = re.search(r"run (\S+) succeeded", done.stderr).group(1)
    assert sql(team.database, "SELECT status FROM runs WHERE run_id = %s", run_id) == [("SUCCESS",)]
    parents = sql(f"{team.database}_mlflow", "SELECT value FROM tags WHERE key = 'scratchllm.parent'")
    assert parents == [("scratchllm/1",)]  # warm-started from the champion, downloaded through the server
    assert not (team.home / "mlflow.db").exists() and not list(tmp_path.glob("mlflow.db"))


def test_the_tracking_server_needs_credentials_and_a_reader_cannot_register(team, whole_graph):
    status, _ = team.rest("experiments/search", {"max_results": 10})
    assert status == 401
    status, _ = team.rest("experiments/create", {"name": "anonymous"})
    assert status == 401
    assert team.rest("experiments/get-by-name?experiment_name=anonymous", user=team.admin)[0] == 404  # nothing written

    reader = ("reader", f"reader-Secret-{secrets.token_hex(4)}")
    status, _ = team.rest("users/create", {"username": reader[0], "password": reader[1]}, user=team.admin)
    assert status == 200
    status, runs = team.rest("runs/search", {"experiment_ids": ["1"], "max_results": 5}, user=reader)
    assert status == 200 and runs["runs"]  # reads what the team trained
    _, version = team.rest("registered-models/alias?name=scratchllm&alias=champion", user=team.admin)
    source = version["model_version"]
    status, _ = team.rest("model-versions/create", {"name": "scratchllm", "source": source["source"],
                                                    "run_id": source["run_id"]}, user=reader)
    assert status == 403
    assert sql(f"{team.database}_mlflow", "SELECT count(*) FROM model_versions WHERE name = 'scratchllm'") == [(1,)]

    # The server caches good password checks (mlflow_auth.ini): a changed password still takes effect at once.
    renewed = f"reader-Renewed-{secrets.token_hex(4)}"
    status, _ = team.rest("users/update-password", {"username": reader[0], "password": renewed}, user=team.admin,
                          method="PATCH")
    assert status == 200
    assert team.rest("runs/search", {"experiment_ids": ["1"], "max_results": 1}, user=reader)[0] == 401
    assert team.rest("runs/search", {"experiment_ids": ["1"], "max_results": 1}, user=(reader[0], renewed))[0] == 200


def test_no_password_is_written_logged_or_shown(team, whole_graph):
    secrets_ = (team.pg_password, team.admin_password)
    written = [p for root in (team.home, team.root / "data", team.artifacts) for p in root.rglob("*") if p.is_file()
               and any(s.encode() in p.read_bytes() for s in secrets_)]
    assert written == []
    events = sql(team.database, "SELECT count(*) FROM event_logs WHERE event LIKE %s OR event LIKE %s",
                 *(f"%{s}%" for s in secrets_))
    assert events == [(0,)] and sql(team.database, "SELECT count(*) FROM event_logs")[0][0] > 50
    for table in ("params", "tags", "model_version_tags", "registered_model_tags"):
        assert sql(f"{team.database}_mlflow", f"SELECT count(*) FROM {table} WHERE value LIKE %s OR value LIKE %s",
                   *(f"%{s}%" for s in secrets_)) == [(0,)], table
    # The UI's pages: the instance settings and the run's config as the webserver serves them.
    page = json.dumps(graphql(team.ports["dagster"], "{ instance { info runQueuingSupported } }"))
    page += json.dumps(graphql(team.ports["dagster"], '{ runOrError(runId: "%s") { ... on Run { runConfigYaml '
                                                      'tags { key value } } } }' % whole_graph))
    assert "PostgresRunStorage" in page and "QueuedRunCoordinator" in page, page  # shown, the secret not
    assert not any(s in page for s in secrets_)
    import psutil

    state = json.loads((team.home / "deploy.json").read_text())
    for entry in [state["supervisor"], *state["services"].values()]:
        assert not any(s in " ".join(psutil.Process(entry["pid"]).cmdline()) for s in secrets_)  # ps shows no secret


def run_window(port: int, run_id: str) -> dict:
    return graphql(port, '{ runOrError(runId: "%s") { ... on Run { status startTime endTime '
                         'tags { key value } } } }' % run_id)["runOrError"]


def seeded(seed: int) -> dict:
    """The launchpad's edit of one value: the training's seed (a new training, the data reused)."""
    return {"ops": {"trained_model": {"config": {"training": {"seed": seed}}}}}


def test_three_runs_at_once_run_one_after_another_and_survive_a_killed_daemon(team, whole_graph, monkeypatch):
    """Two users launch the whole graph and a third a training, at the same moment, with
    max_concurrent_runs 1; the daemon is killed -9 while they wait: the supervisor restarts it, each
    run runs in turn, and every training, MLflow run and registry version is accounted for."""
    import signal

    import dagster as dg

    port = team.ports["dagster"]
    runs = {"alice": launch_assets(port, ALL_ASSETS, seeded(101), {"user": "alice"}),
            "bob": launch_assets(port, ALL_ASSETS, seeded(102), {"user": "bob"}),
            "carol": launch_assets(port, ["trained_model"], seeded(103), {"user": "carol"})}
    assert sum(run_status(port, r) == "QUEUED" for r in runs.values()) >= 2  # one at a time
    daemon = json.loads((team.home / "deploy.json").read_text())["services"]["daemon"]
    os.killpg(daemon["pid"], signal.SIGKILL)
    wait_until(lambda: all(run_status(port, r) in ("SUCCESS", "FAILURE", "CANCELED") for r in runs.values()),
               what="the end of the three runs", timeout=600)
    restarted = json.loads((team.home / "deploy.json").read_text())["services"]["daemon"]
    assert restarted["restarts"] == 1 and restarted["pid"] != daemon["pid"]
    windows = sorted((run_window(port, r) for r in runs.values()), key=lambda w: w["startTime"])
    assert [w["status"] for w in windows] == ["SUCCESS"] * 3
    assert all(a["endTime"] <= b["startTime"] for a, b in zip(windows, windows[1:]))  # never two at once

    monkeypatch.setenv("PGPASSWORD", team.pg_password)
    with dg.DagsterInstance.from_config(str(team.home)) as instance:
        def metadata(asset: str, run_id: str) -> dict:
            records = instance.fetch_materializations(dg.AssetKey(asset), limit=50).records
            found = [r.asset_materialization.metadata for r in records if r.run_id == run_id]
            return {k: v.value for k, v in found[0].items()} if found else {}

        trained = {user: metadata("trained_model", r) for user, r in [("first", whole_graph), *runs.items()]}
        registered = {user: metadata("registered_model", runs[user]) for user in ("alice", "bob")}
    mlflow_runs = {user: m["mlflow_run_id"] for user, m in trained.items()}
    assert len(set(mlflow_runs.values())) == 4  # four trainings, one MLflow run each
    for user, seed in (("alice", 101), ("bob", 102), ("carol", 103)):
        status, got = team.rest(f"runs/get?run_id={mlflow_runs[user]}", user=team.admin)
        params = {p["key"]: p["value"] for p in got["run"]["data"]["params"]}
        assert got["run"]["info"]["status"] == "FINISHED" and params["training.seed"] == str(seed), user
    versions = sql(f"{team.database}_mlflow", "SELECT version, run_id FROM model_versions WHERE name = 'scratchllm'")
    by_version = {str(v): run_id for v, run_id in versions}
    assert len(versions) == 3  # the first run's, alice's, bob's
    for user in ("alice", "bob"):
        assert by_version[str(registered[user]["model_version"])] == mlflow_runs[user], user


def long_training(seed: int) -> dict:
    """A training that passes step 50, where it holds (the deployment's SCRATCHLLM_HOLD_AT)."""
    return {"ops": {"trained_model": {"config": {"training": {
        "seed": seed, "max_steps": 60, "checkpoint_interval": 10, "eval_interval": 30}}}}}


def test_a_killed_tracking_server_or_run_worker_loses_nothing(team, whole_graph, monkeypatch):
    """kill -9 of the MLflow server while a training holds at step 50, then the training goes on: the
    supervisor restarts the server, the training's calls retry, its run has every metric. Then kill -9
    of a run worker at the same point: the run is marked failed, the `training` pool freed, and a new
    launch resumes from the checkpoint."""
    import signal

    import dagster as dg

    from pipelines.runs import pool_holders, run_process

    port = team.ports["dagster"]
    first = launch_assets(port, ["trained_model"], long_training(201))
    wait_until(team.held.exists, what="the training at step 50", timeout=300)
    running = sql(f"{team.database}_mlflow", "SELECT run_uuid FROM runs WHERE status = 'RUNNING'")
    assert len(running) == 1
    server = json.loads((team.home / "deploy.json").read_text())["services"]["mlflow"]
    os.killpg(server["pid"], signal.SIGKILL)
    team.held.unlink()  # the training goes on, the server gone
    wait_until(lambda: run_status(port, first) in ("SUCCESS", "FAILURE", "CANCELED"), what="the end of the training",
               timeout=400)
    assert run_status(port, first) == "SUCCESS"
    assert json.loads((team.home / "deploy.json").read_text())["services"]["mlflow"]["restarts"] == 1
    mlflow_run = running[0][0]
    assert sql(f"{team.database}_mlflow", "SELECT status FROM runs WHERE run_uuid = %s", mlflow_run) == [("FINISHED",)]
    steps = {s for (s,) in sql(f"{team.database}_mlflow", "SELECT step FROM metrics WHERE run_uuid = %s AND "
                                                          "key = 'train_loss'", mlflow_run)}
    assert {10, 20, 30, 40, 50, 60} <= steps, sorted(steps)  # before, during and after the outage

    killed = launch_assets(port, ["trained_model"], long_training(202))
    wait_until(team.held.exists, what="the second training at step 50", timeout=300)
    monkeypatch.setenv("PGPASSWORD", team.pg_password)
    with dg.DagsterInstance.from_config(str(team.home)) as instance:
        worker, _ = run_process(instance, killed)
        os.kill(worker, signal.SIGKILL)  # the run worker, as the OOM killer would
        wait_until(lambda: run_status(port, killed) == "FAILURE", what="the dead run marked failed", timeout=120)
        wait_until(lambda: not pool_holders(instance, "training"), what="the training pool freed", timeout=60)
    again = launch_assets(port, ["trained_model"], long_training(202))  # the marker stays: no hold this time
    wait_until(lambda: run_status(port, again) in ("SUCCESS", "FAILURE", "CANCELED"), what="the resumed training",
               timeout=400)
    assert run_status(port, again) == "SUCCESS"
    with dg.DagsterInstance.from_config(str(team.home)) as instance:
        record = instance.fetch_materializations(dg.AssetKey("trained_model"), limit=1).records[0]
    assert record.run_id == again and record.asset_materialization.metadata["resumed_from_step"].value >= 40


START_SCHEDULE = """mutation($selector: ScheduleSelector!) { startSchedule(scheduleSelector: $selector) {
  __typename ... on ScheduleStateResult { scheduleState { id status } } ... on PythonError { message } } }"""
STOP_SCHEDULE = """mutation($id: String!) { stopRunningSchedule(id: $id) { __typename } }"""
START_SENSOR = """mutation($selector: SensorSelector!) { startSensor(sensorSelector: $selector) {
  __typename ... on Sensor { sensorState { id status } } ... on PythonError { message } } }"""
STOP_SENSOR = """mutation($id: String!) { stopSensor(id: $id) { __typename } }"""
RUNS_TAGGED = """query($key: String!, $value: String!) { runsOrError(filter: {tags: [{key: $key, value: $value}]}) {
  ... on Runs { results { runId status tags { key value } } } } }"""


def test_the_schedule_fires_and_the_new_data_sensor_retrains_in_the_daemon(team, whole_graph):
    """Both turned on in the UI (GraphQL, as its toggles do): the schedule (every minute here) starts a
    retrain at its next tick; a file added to the corpus makes the sensor start one; both run to the end."""
    port = team.ports["dagster"]
    repository = graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
                               "location { name } } } } }")["repositoriesOrError"]["nodes"][0]
    where = {"repositoryLocationName": repository["location"]["name"], "repositoryName": repository["name"]}
    (team.corpus / "new_play.txt").write_text(SHAKESPEARE[300_000:330_000])
    sensor = graphql(port, START_SENSOR, {"selector": {**where, "sensorName": "new_data_sensor"}})["startSensor"]
    schedule = graphql(port, START_SCHEDULE,
                       {"selector": {**where, "scheduleName": "retrain_schedule"}})["startSchedule"]
    assert sensor["sensorState"]["status"] == schedule["scheduleState"]["status"] == "RUNNING", (sensor, schedule)

    def tagged(key: str, value: str) -> list[dict]:
        return graphql(port, RUNS_TAGGED, {"key": key, "value": value})["runsOrError"]["results"]

    started: dict[str, dict] = {}
    stops = {"dagster/sensor_name": (STOP_SENSOR, sensor["sensorState"]["id"], "new_data_sensor"),
             "dagster/schedule_name": (STOP_SCHEDULE, schedule["scheduleState"]["id"], "retrain_schedule")}

    def both_started() -> bool:
        for key, (mutation, state_id, name) in stops.items():
            if key not in started and (runs := tagged(key, name)):
                started[key] = runs[0]
                graphql(port, mutation, {"id": state_id})  # one run each is the proof: turned off again
        return len(started) == 2

    wait_until(both_started, what="a run from the schedule and one from the sensor", timeout=180)
    ids = [r["runId"] for r in started.values()]
    wait_until(lambda: all(run_status(port, r) in ("SUCCESS", "FAILURE", "CANCELED") for r in ids),
               what="the end of both retrains", timeout=400)
    assert [run_status(port, r) for r in ids] == ["SUCCESS", "SUCCESS"]
    tags = {t["key"]: t["value"] for t in started["dagster/sensor_name"]["tags"]}
    assert tags["scratchllm/trigger"] == "new_data" and tags["scratchllm/changes"].startswith("1 new"), tags


def test_status_then_stop_leaves_no_service(team, whole_graph):
    """Even with the supervisor killed -9 first: stop finds its services by their recorded ids."""
    import signal

    import psutil

    env = user_env(team.root)
    status = deploy("status", "--home", str(team.home), env=env, cwd=team.root / "elsewhere")
    assert status.returncode == 0 and status.stdout.count("running") == 4, status.stdout + status.stderr
    state = json.loads((team.home / "deploy.json").read_text())
    pids = [state["supervisor"]["pid"], *(e["pid"] for e in state["services"].values())]
    family = {p.pid for pid in pids for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]}
    os.kill(state["supervisor"]["pid"], signal.SIGKILL)  # the supervisor alone: its services go on, unwatched
    assert deploy("status", "--home", str(team.home), env=env, cwd=team.root).returncode == 1
    refused = team.up()
    assert refused.returncode == 2 and "deploy stop" in refused.stderr and "webserver" in refused.stderr
    stopped = deploy("stop", "--home", str(team.home), env=env, cwd=team.root / "elsewhere")
    assert stopped.returncode == 0, stopped.stderr
    left = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert left == []
    assert deploy("status", "--home", str(team.home), env=env, cwd=team.root).returncode == 1

    # Restarted on a database whose MLflow schema is not this MLflow's: refused, naming the upgrade.
    schema = f"{team.database}_mlflow"
    (current,) = sql(schema, "SELECT version_num FROM alembic_version")[0]
    sql(schema, "UPDATE alembic_version SET version_num = 'an_old_one'")
    try:
        again = team.up()
    finally:
        sql(schema, "UPDATE alembic_version SET version_num = %s", current)
    assert again.returncode == 2 and "scratchllm deploy upgrade" in again.stderr and "an_old_one" in again.stderr
    assert deploy("status", "--home", str(team.home), env=env, cwd=team.root).returncode == 1  # nothing started


def test_up_refuses_what_it_cannot_do_before_starting_anything(tmp_path):
    base = ["up", "--artifacts", str(tmp_path / "a"), "--home", str(tmp_path / "h")]
    no_admin = deploy(*base, "--database", "postgresql://postgres@127.0.0.1:5432/x", env=user_env(tmp_path),
                      cwd=tmp_path)
    assert no_admin.returncode == 2 and "SCRATCHLLM_ADMIN_PASSWORD" in no_admin.stderr
    env = user_env(tmp_path, SCRATCHLLM_ADMIN_PASSWORD="long-enough-password")
    nobody = deploy(*base, "--database", f"postgresql://postgres:Hidden-pw-1@127.0.0.1:{free_port()}/x", env=env,
                    cwd=tmp_path)
    assert nobody.returncode == 2 and "cannot connect to PostgreSQL" in nobody.stderr
    assert "Hidden-pw-1" not in nobody.stderr + nobody.stdout
    wrong = deploy(*base, "--database", "mysql://root@127.0.0.1/x", env=env, cwd=tmp_path)
    assert wrong.returncode == 2 and "--database" in wrong.stderr
    assert not (tmp_path / "h").exists()


def test_a_tracking_uri_with_credentials_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"tracking\.uri.*MLFLOW_TRACKING_USERNAME"):
        load_config(overrides={"tracking": {"uri": "http://admin:secret@127.0.0.1:5000"}})
    assert load_config(overrides={"tracking": {"uri": "http://127.0.0.1:5000"}}).tracking.uri == "http://127.0.0.1:5000"


def test_scratchllm_ui_on_a_profile_with_a_tracking_server_starts_no_mlflow_server_of_its_own():
    from pipelines.ui import server_commands

    served = load_config(overrides={"tracking": {"uri": "http://127.0.0.1:5000"}})
    assert list(server_commands(served, "127.0.0.1", 3000, 5000)) == ["dagster"]
    assert list(server_commands(load_config(), "127.0.0.1", 3000, 5000)) == ["dagster", "mlflow"]
