"""`engine.kind: ray` on a real 2-node Ray cluster on this machine (head 127.0.0.2, worker 127.0.0.3,
1 CPU each; tests/ray_cluster.py), through the paths a user takes: the UI's one-click "Materialize
all" (a GraphQL launch to `dagster dev`) and `scratchllm run`, from another working directory.

The data stages' outputs (raw shards, kept shards, removed-document ledgers, quarantine, tokenizer,
token files) and their Dagster data versions must be byte-identical to a run of the local engine, on
a corpus with exact and near duplicates and bad records; tasks must have run on both nodes; a Ray
worker killed -9 in the middle of cleaned_shards must change nothing; no process of the cluster may
hold a connection outside loopback."""

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml
from helpers import free_port, held_pid, launch_assets, run_status, wait_until, write_jsonl
from ray_cluster import HEAD_IP, WORKER_IP, non_loopback_connections

from llm_core.config import PROJECT_ROOT
from pipelines.ui import wait_until_up

pytestmark = [pytest.mark.slow, pytest.mark.ray]
SHAKESPEARE = (PROJECT_ROOT / "data" / "tinyshakespeare.txt").read_text()
CLI = [sys.executable, "-m", "pipelines.cli"]
ALL_ASSETS = ["raw_corpus", "cleaned_shards", "tokenizer", "tokenized_dataset", "trained_model", "model_evaluation",
              "registered_model", "hf_export"]
DATA_ASSETS = ALL_ASSETS[:4]
DATA_OUTPUTS = ["raw_corpus", "cleaned_shards/shards", "cleaned_shards/removed", "cleaned_shards/manifest.json",
                "quarantine", "tokenizer", "tokenized_dataset"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Scenes of three plays, an exact and a near copy of one, and a JSONL file with a bad record, in
    shards small enough that every stage has several tasks to spread."""
    root = tmp_path_factory.mktemp("ray_corpus")
    plays = [SHAKESPEARE[i * 30_000:(i + 1) * 30_000] for i in range(3)]
    for i, play in enumerate(plays):
        (root / f"play_{i}.txt").write_text(play)
    (root / "play_0_copy.txt").write_text(plays[0])  # every scene an exact duplicate
    (root / "play_1_edited.txt").write_text(plays[1].replace("And ", "But "))  # scenes near their originals
    write_jsonl(root / "notes.jsonl", [SHAKESPEARE[200_000 + k * 3000:200_000 + (k + 1) * 3000] for k in range(10)])
    with open(root / "notes.jsonl", "a") as fh:
        fh.write('{"text": "an unfinished record\n')  # quarantined, on both engines alike
    return root


def write_profile(path: Path, corpus: Path, data_dir: Path, engine: dict) -> Path:
    path.write_text(yaml.safe_dump({
        "data_dir": str(data_dir), "engine": engine,
        "corpus": {"sources": [str(corpus)], "max_document_bytes": 2048, "shard_size_mb": 0.03,
                   "pieces_are_documents": [str(corpus)]},  # scenes: the dedup and split units
        "cleaning": {"num_workers": 1}, "dataset": {"val_fraction": 0.3}, "tokenizer": {"vocab_size": 300},
        "model": {"n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "block_size": 32},
        "training": {"peak_flops": 1e12, "max_steps": 6, "warmup_steps": 2, "batch_size": 4, "eval_interval": 3,
                     "checkpoint_interval": 3, "eval_batches": 2},
        "evaluation": {"max_new_tokens": 8}}))
    return path


def newcomer_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No MLflow or scratchllm variables, a DAGSTER_HOME of its own; Ray's test settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SCRATCHLLM_"))}
    return {**env, "DAGSTER_HOME": str(tmp / "dagster_home"), "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", **extra}


def scratchllm_run(profile: Path, env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    return subprocess.run([*CLI, "run", "--config", str(profile), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def fingerprints(data_dir: Path) -> dict[str, str]:
    """sha256 of every file of the data stages' outputs, by path under data_dir."""
    found = {}
    for name in DATA_OUTPUTS:
        paths = [data_dir / name] if (data_dir / name).is_file() else sorted((data_dir / name).rglob("*"))
        found.update({str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in paths if p.is_file()})
    return found


def materializations(dagster_home: Path) -> dict[str, dg.AssetMaterialization]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return {key: instance.get_latest_materialization_event(dg.AssetKey(key)).asset_materialization
                for key in DATA_ASSETS}


def data_versions(dagster_home: Path) -> dict[str, str]:
    return {key: m.tags["dagster/data_version"] for key, m in materializations(dagster_home).items()}


def nodes_that_worked(dagster_home: Path, asset: str) -> set[str]:
    """The node addresses in the asset's tasks_per_node table (| node | tasks |)."""
    table = materializations(dagster_home)[asset].metadata["tasks_per_node"].value
    return {line.split("|")[1].strip() for line in table.splitlines()[2:]}


@pytest.fixture(scope="module")
def local_reference(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """The data stages with the local engine, through `scratchllm run`: (data_dir, DAGSTER_HOME)."""
    tmp = tmp_path_factory.mktemp("local_reference")
    profile = write_profile(tmp / "local.yaml", corpus, tmp / "data", {"kind": "local"})
    done = scratchllm_run(profile, newcomer_env(tmp), tmp / "elsewhere", "--select", ",".join(DATA_ASSETS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = {key: m.metadata for key, m in materializations(tmp / "dagster_home").items()}
    assert found["raw_corpus"]["num_quarantined"].value == 1  # the unfinished record
    cleaned = {k: found["cleaned_shards"][k].value for k in ("num_exact_duplicates", "num_near_duplicates")}
    assert min(cleaned.values()) > 10, cleaned  # the copies are found, on both engines alike
    assert len(list((tmp / "data" / "raw_corpus" / "shards").iterdir())) >= 4  # work for both nodes
    return tmp / "data", tmp / "dagster_home"


def assert_same_data_as(reference: tuple[Path, Path], data_dir: Path, dagster_home: Path) -> None:
    expected, got = fingerprints(reference[0]), fingerprints(data_dir)
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if got[k] != expected[k]] == []
    assert data_versions(dagster_home) == data_versions(reference[1])


def test_the_ui_one_click_path_on_ray_makes_the_same_data_as_the_local_engine(
        ray_cluster, corpus, local_reference, tmp_path, monkeypatch):
    from pipelines import ui
    from pipelines.cli import prepare_environment

    profile = write_profile(tmp_path / "ray.yaml", corpus, tmp_path / "data",
                            {"kind": "ray", "address": ray_cluster.address})
    env = newcomer_env(tmp_path, SCRATCHLLM_CONFIG=str(profile))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    prepare_environment(None)
    port = free_port()
    servers = ui.start({"dagster": [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"),
                                    "-h", "127.0.0.1", "-p", str(port)]})
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/server_info")
        run_id = launch_assets(port, ALL_ASSETS)  # "Materialize all"
        wait_until(lambda: run_status(port, run_id) in ("SUCCESS", "FAILURE", "CANCELED"), *servers.values(),
                   what="the end of the run", timeout=540)
        assert run_status(port, run_id) == "SUCCESS"
        assert ray_cluster.non_loopback_connections() == []
        server_pids = {p.pid for proc in servers.values() for p in [psutil.Process(proc.pid),
                                                                       *psutil.Process(proc.pid).children(True)]}
        assert non_loopback_connections(server_pids) == []
    finally:
        ui.stop(servers)
    assert_same_data_as(local_reference, tmp_path / "data", tmp_path / "dagster_home")
    for asset in ("raw_corpus", "cleaned_shards", "tokenized_dataset"):
        assert nodes_that_worked(tmp_path / "dagster_home", asset) == {HEAD_IP, WORKER_IP}, asset

    # Switching back to the local engine on the same data_dir: every shard is reused, nothing looks new.
    before = data_versions(tmp_path / "dagster_home")
    profile = write_profile(tmp_path / "local.yaml", corpus, tmp_path / "data", {"kind": "local"})
    done = scratchllm_run(profile, newcomer_env(tmp_path), tmp_path / "elsewhere", "--select", ",".join(DATA_ASSETS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = {key: m.metadata for key, m in materializations(tmp_path / "dagster_home").items()}
    assert [found[asset][field].value for asset, field in [("raw_corpus", "num_shards_built"),
                                                           ("cleaned_shards", "num_parts_cleaned"),
                                                           ("cleaned_shards", "num_shards_written"),
                                                           ("tokenized_dataset", "num_shards_encoded")]] == [0, 0, 0, 0]
    assert data_versions(tmp_path / "dagster_home") == before


def test_a_ray_worker_killed_during_cleaned_shards_changes_nothing(ray_cluster, corpus, local_reference, tmp_path):
    """`scratchllm run` of the whole graph; the first cleaning task stops at a hold point in its Ray worker,
    which the test kills -9 as the OOM killer would: Ray reruns the task and the run ends as the local one."""
    profile = write_profile(tmp_path / "ray.yaml", corpus, tmp_path / "data",
                            {"kind": "ray", "address": ray_cluster.address})
    marker = tmp_path / "held"
    env = newcomer_env(tmp_path, SCRATCHLLM_HOLD_AT="clean_part:*", SCRATCHLLM_HOLD_MARKER=str(marker))
    (tmp_path / "elsewhere").mkdir()
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "run", "--config", str(profile)], cwd=tmp_path / "elsewhere", env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    proc.stdout_path = log
    try:
        wait_until(marker.exists, proc, what="the hold in a cleaning task", timeout=300)
        worker = held_pid(marker)
        assert worker in ray_cluster.pids()  # a Ray worker process, not the driver
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not psutil.pid_exists(worker)
    assert_same_data_as(local_reference, tmp_path / "data", tmp_path / "dagster_home")
    assert nodes_that_worked(tmp_path / "dagster_home", "raw_corpus") == {HEAD_IP, WORKER_IP}
    # While the held task blocks one node's only CPU, the other node takes the rest of the cleaning (and
    # the rerun of the killed task may land on either): which nodes finish its tasks depends on timing.
    assert nodes_that_worked(tmp_path / "dagster_home", "cleaned_shards") <= {HEAD_IP, WORKER_IP}


def test_a_ray_address_nobody_listens_on_fails_fast_naming_it(corpus, tmp_path):
    address = f"{HEAD_IP}:{free_port()}"
    profile = write_profile(tmp_path / "ray.yaml", corpus, tmp_path / "data", {"kind": "ray", "address": address})
    done = scratchllm_run(profile, newcomer_env(tmp_path), tmp_path / "elsewhere", "--select", "raw_corpus")
    assert done.returncode != 0
    assert f"cannot reach the Ray cluster at {address} (engine.address)" in done.stdout + done.stderr


def test_address_local_starts_a_private_cluster_for_the_stage_and_stops_it(corpus, tmp_path):
    profile = write_profile(tmp_path / "ray.yaml", corpus, tmp_path / "data",
                            {"kind": "ray", "address": "local", "local_num_cpus": 1})
    (tmp_path / "elsewhere").mkdir()
    proc = subprocess.Popen([*CLI, "run", "--config", str(profile), "--select", "raw_corpus"], text=True,
                            cwd=tmp_path / "elsewhere", env=newcomer_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "starting a private Ray cluster on 127.0.0.2" in output
    # `scratchllm run` runs the stages in its own process; Ray names the session after the process that started it.
    session = re.compile(rf"session_[\d_-]+_{proc.pid}\b")
    assert [p for p in Path("/tmp/ray").iterdir() if session.fullmatch(p.name)]  # it was that cluster's
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if session.search(" ".join(p.info["cmdline"] or ()))]
    assert left == []


def test_every_node_must_see_data_dir(ray_cluster, tmp_path, monkeypatch):
    """On a cluster, data_dir must be storage every node mounts at the same path (checked when the
    engine starts). /proc/self/cwd is a path that each process resolves to its own working directory:
    the driver writes its probe there, and no node's worker finds it."""
    import ray

    from llm_core.data.engine import EngineError, check_shared_directory

    monkeypatch.chdir(tmp_path)
    for name, value in ray_cluster.env().items():
        monkeypatch.setenv(name, value)
    ray.init(address=ray_cluster.address, _node_ip_address=HEAD_IP, log_to_driver=False)
    try:
        assert sorted(check_shared_directory(ray, tmp_path / "shared").values()) == [HEAD_IP, WORKER_IP]
        with pytest.raises(EngineError, match=f"not visible from Ray node\\(s\\) ({HEAD_IP}, {WORKER_IP}|"
                                              f"{WORKER_IP}, {HEAD_IP}): with engine.kind: ray, data_dir must be"):
            check_shared_directory(ray, "/proc/self/cwd/not_shared")
    finally:
        ray.shutdown()
    assert list((tmp_path / "shared").iterdir()) == []  # the probe is removed
