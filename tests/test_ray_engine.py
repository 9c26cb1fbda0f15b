"""`engine.kind: ray` on a real 2-node Ray cluster on this machine (head 127.0.0.2, worker 127.0.0.3,
1 CPU each; tests/ray_cluster.py), through the paths a user takes: the UI's one-click "Materialize
all" (a GraphQL launch to `dagster dev`) and `scratchllm run`, from another working directory.

The data stages' outputs (raw shards, kept shards, removed-document ledgers, quarantine, tokenizer,
token files) and their Dagster data versions must be byte-identical to a run of the local engine, on
a corpus with exact and near duplicates and bad records; tasks must have run on both nodes; a Ray
worker killed -9 in the middle of cleaned_shards must change nothing; no process of the cluster may
hold a connection outside loopback.

The training (Ray Train, llm_core/training/cluster.py) runs one worker per node, with the losses of
2 local ranks step for step; a worker killed -9 costs a restart from the last checkpoint and nothing
else; a spent failure budget and a cancel end it cleanly."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml
from helpers import (QUIET, config, free_port, held_pid, launch_assets, run, run_status, subprocess_env, summary,
                     train_command, wait_until, write_jsonl)
from ray_cluster import HEAD_IP, WORKER_IP, non_loopback_connections

from llm_core.config import PROJECT_ROOT, EngineConfig, ScratchConfig
from llm_core.training.cluster import train_on_cluster
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


def write_profile(path: Path, corpus: Path, data_dir: Path, engine: dict, **more) -> Path:
    path.write_text(yaml.safe_dump({**more,
        "data_dir": str(data_dir), "engine": engine,
        "corpus": {"sources": [str(corpus)], "max_document_bytes": 2048, "shard_size_mb": 0.03,
                   "pieces_are_documents": [str(corpus)]},  # scenes: the dedup and split units
        "cleaning": {"num_workers": 1}, "dataset": {"val_fraction": 0.3}, "tokenizer": {"vocab_size": 300},
        "model": {"n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "block_size": 32},
        "training": {"peak_flops": 1e12, "max_steps": 6, "warmup_steps": 2, "batch_size": 4, "eval_interval": 3,
                     "checkpoint_interval": 3, "eval_batches": 2, "max_parallel_variants": 2},
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


def test_the_ui_one_click_path_on_ray_makes_the_same_data_as_the_local_engine_and_trains_there(
        ray_cluster, corpus, local_reference, tmp_path, monkeypatch):
    """"Materialize all" of a profile on the cluster with a 2-variant sweep: the data stages' outputs as the
    local engine's, the variants trained side by side as two Ray Train jobs (one per node), the best registered.
    (The UI's Terminate reaches a training as a SIGINT to its process-group wrapper (tests/test_runs.py);
    what that SIGINT does on the cluster: test_cancelling_a_cluster_training_stops_every_worker_on_every_node.)"""
    from pipelines import ui
    from pipelines.cli import prepare_environment

    profile = write_profile(tmp_path / "ray.yaml", corpus, tmp_path / "data",
                            {"kind": "ray", "address": ray_cluster.address},
                            sweep={"training.learning_rate": [1e-3, 3e-3]})  # side by side, each on a node
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
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:  # trained there too
        trained = instance.get_latest_materialization_event(dg.AssetKey("trained_model")).asset_materialization
        variants = [r.asset_observation.metadata for r in
                    instance.fetch_observations(dg.AssetKey("trained_model"), limit=10).records]
        registered = instance.get_latest_materialization_event(dg.AssetKey("registered_model"))
    assert trained.metadata["num_variants"].value == trained.metadata["variants_at_once"].value == 2
    # Each variant a Ray Train job of 1 worker (1 CPU): the two at once need both nodes.
    assert sorted(v["nodes"].value for v in variants) == [HEAD_IP, WORKER_IP]
    assert [v["world_size"].value for v in variants] == [1, 1] and [v["restarts"].value for v in variants] == [0, 0]
    assert registered is not None

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
    """`scratchllm run` of the data stages; the first cleaning task stops at a hold point in its Ray worker,
    which the test kills -9 as the OOM killer would: Ray reruns the task and the run ends as the local one."""
    profile = write_profile(tmp_path / "ray.yaml", corpus, tmp_path / "data",
                            {"kind": "ray", "address": ray_cluster.address})
    marker = tmp_path / "held"
    env = newcomer_env(tmp_path, SCRATCHLLM_HOLD_AT="clean_part:*", SCRATCHLLM_HOLD_MARKER=str(marker))
    (tmp_path / "elsewhere").mkdir()
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "run", "--config", str(profile), "--select", ",".join(DATA_ASSETS)],
                                cwd=tmp_path / "elsewhere", env=env, stdout=out, stderr=subprocess.STDOUT)
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


# ---------------------------------------------------------------------------------------------
# training on the cluster (Ray Train)


@pytest.fixture
def on_cluster(ray_cluster, data_dir, tmp_path, monkeypatch):
    """A training config of 2 ranks on the ci profile's dataset, for the cluster (with engine overrides);
    this process is its driver."""
    for name, value in ray_cluster.env().items():
        monkeypatch.setenv(name, value)

    def make(training: dict | None = None, **engine) -> ScratchConfig:
        cfg = config(data_dir, num_processes=2, batch_size=2, **(training or {}))
        return cfg.model_copy(update={"engine": EngineConfig(kind="ray", address=ray_cluster.address, **engine)})
    return make


def kill_at_hold(marker: Path, ray_cluster, seen: dict) -> threading.Thread:
    """A thread that waits for the hold, notes what it sees then (the held pid, connections that leave
    loopback) and kills the held worker -9."""
    def kill() -> None:
        while not marker.exists():
            time.sleep(0.05)
        seen["pid"] = held_pid(marker)
        seen["cluster_pids"] = ray_cluster.pids()
        seen["outside_loopback"] = ray_cluster.non_loopback_connections()
        os.kill(seen["pid"], signal.SIGKILL)
    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_training_on_the_cluster_has_the_local_losses_and_survives_a_killed_worker(
        on_cluster, ray_cluster, tmp_path, monkeypatch):
    """Two workers, one per node, give the losses of 2 local ranks (`accelerate launch`) step for step.
    The worker on 127.0.0.3 is killed -9 at step 15 (after the checkpoint of step 10): Ray Train restarts
    the group, the loop resumes from step 10 and ends on the local run's loss. While it trains (at the
    hold), no connection of the cluster leaves loopback (gloo included)."""
    cfg = on_cluster()
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         *train_command(cfg, tmp_path / "local")])
    local = summary(tmp_path / "local")["history"]
    marker, seen, lines = tmp_path / "held", {}, []
    monkeypatch.setenv("SCRATCHLLM_HOLD_AT", f"{WORKER_IP}/step:15")
    monkeypatch.setenv("SCRATCHLLM_HOLD_MARKER", str(marker))
    killer = kill_at_hold(marker, ray_cluster, seen)
    result, where = train_on_cluster(cfg, tmp_path / "ray", log=lines.append)
    killer.join(timeout=5)
    assert seen["pid"] in seen["cluster_pids"] and not psutil.pid_exists(seen["pid"])  # a worker of the cluster
    assert seen["outside_loopback"] == []
    assert sorted(where.nodes) == [HEAD_IP, WORKER_IP] and where.restarts == 1
    assert any(line.startswith("the training's workers were restarted (1 of engine.max_training_failures: 3)")
               for line in lines), lines
    assert f"resumed from {tmp_path / 'ray' / 'checkpoints' / 'step_10'} (step 10)" in lines
    assert result.world_size == 2 and [h["step"] for h in result.history] == list(range(1, 21))
    for ours, theirs in zip(result.history, local, strict=True):
        assert abs(ours["train_loss"] - theirs["train_loss"]) < 1e-5, (ours, theirs)
    assert abs(result.final_train_loss - local[-1]["train_loss"]) < 1e-6
    assert (tmp_path / "ray" / "model.safetensors").exists()


def test_with_its_failure_budget_spent_a_cluster_training_fails_naming_it(
        on_cluster, ray_cluster, tmp_path, monkeypatch):
    from llm_core.training.cluster import BudgetSpent, failure

    marker, seen = tmp_path / "held", {}
    monkeypatch.setenv("SCRATCHLLM_HOLD_AT", f"{WORKER_IP}/step:1")
    monkeypatch.setenv("SCRATCHLLM_HOLD_MARKER", str(marker))
    killer = kill_at_hold(marker, ray_cluster, seen)
    with pytest.raises(BudgetSpent, match=r"failed after 0 restart\(s\), the most engine.max_training_failures "
                                          r"\(0\) allows") as raised:
        train_on_cluster(on_cluster(max_training_failures=0), tmp_path / "ray", log=QUIET)
    killer.join(timeout=5)
    assert failure(tmp_path / "ray") == str(raised.value)  # what the trained_model asset fails with


def test_cancelling_a_cluster_training_stops_every_worker_on_every_node(on_cluster, ray_cluster, tmp_path):
    """What the UI's Terminate (or Ctrl-C of `scratchllm run`) does to the command trained_model runs
    (pipelines/resources.py run_side_by_side): SIGINT to the process-group wrapper around the driver.
    Every worker, on both nodes, is gone within 10 s."""
    from pipelines.resources import launch_command

    cfg = on_cluster(training={"max_steps": 100_000, "checkpoint_interval": 100_000, "eval_interval": 100_000})
    command = launch_command(cfg, "llm_core.training.cluster", train_command(cfg, tmp_path / "cancelled")[2:])
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env={**subprocess_env(), **ray_cluster.env()},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers, output = {}, []
    try:
        for line in proc.stdout:  # until both workers started
            output.append(line)
            if found := re.search(r"worker (\d): node (\S+), pid (\d+)", line):
                workers[found[2]] = psutil.Process(int(found[3]))
            if len(workers) == 2:
                break
        assert sorted(workers) == [HEAD_IP, WORKER_IP], "".join(output)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(list(workers.values()), timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_trainings_side_by_side_that_the_cluster_cannot_hold_are_refused_naming_the_fields(on_cluster):
    from llm_core.config import ConfigError
    from llm_core.training.cluster import check_cluster_room

    cfg = on_cluster()
    check_cluster_room([cfg], 1)  # 2 workers x 1 CPU: the 2 nodes' CPUs
    with pytest.raises(ConfigError, match=r"training.max_parallel_variants \(2\) x training.num_processes \(2\) x "
                                          r"engine.cpus_per_worker \(1\) = 4 CPUs, but the Ray cluster has 2"):
        check_cluster_room([cfg], 2)
    with pytest.raises(ConfigError, match=r"engine.cpus_per_worker \(1.5\) = 3 CPUs"):
        check_cluster_room([on_cluster(cpus_per_worker=1.5)], 1)
