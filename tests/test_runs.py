"""Crashes and double clicks, for real: `scratchllm run` killed with kill -9 during training, then run
again; Ctrl-C and SIGTERM of a running and of a waiting run; two runs on one data_dir at once; the
same kill from the UI path (`dagster dev`, a GraphQL launch). Every run goes through the real CLI or
server, from another working directory, with no MLflow variable set; the kill points are signalled
by the code (llm_core/faults.py), never timed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml
from helpers import free_port, held_pid, launch_assets, run_messages, run_status, terminate_run, wait_until

from llm_core.config import PROJECT_ROOT
from llm_core.run_lock import DirectoryLock
from llm_core.training.performance import available_cores
from pipelines.runs import run_process
from pipelines.ui import wait_until_up

pytestmark = pytest.mark.slow
SHAKESPEARE = (PROJECT_ROOT / "data" / "tinyshakespeare.txt").read_text()
CLI = [sys.executable, "-m", "pipelines.cli"]
DATA_ASSETS = "raw_corpus,cleaned_shards,tokenizer,tokenized_dataset"
STOP_SECONDS = 20  # "within seconds": the CLI's grace is 15 s at most


@pytest.fixture
def project(tmp_path):
    """(profile, env, working directory) of a newcomer: a small corpus, a tiny training with a
    checkpoint every 4 steps, DAGSTER_HOME of its own, no MLflow variables, another directory."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"play_{i}.txt").write_text(SHAKESPEARE[i * 40_000:(i + 1) * 40_000])
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "corpus": {"sources": [str(corpus)], "max_document_bytes": 2048,
                                              "pieces_are_documents": [str(corpus)]},  # scenes, for a val split
        "cleaning": {"num_workers": 1}, "dataset": {"val_fraction": 0.3}, "tokenizer": {"vocab_size": 300},
        "model": {"n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "block_size": 32},
        "training": {"max_steps": 12, "warmup_steps": 2, "batch_size": 4, "eval_interval": 4,
                     "checkpoint_interval": 4, "eval_batches": 2, "peak_flops": 1e12}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SCRATCHLLM_"))}
    env["DAGSTER_HOME"] = str(tmp_path / "dagster_home")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return profile, env, elsewhere


def start(project, *args: str, hold: str | None = None, marker: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """`scratchllm run --config P ARGS` in the background; its output goes to a file."""
    profile, env, elsewhere = project
    if hold:
        env = {**env, "SCRATCHLLM_HOLD_AT": hold, "SCRATCHLLM_HOLD_MARKER": str(marker)}
    log = elsewhere.parent / f"run-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "run", "--config", str(profile), *args], cwd=elsewhere, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    proc.stdout_path = log  # shown when it ends too early
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    return log.read_text()


def gone_within(pid: int, seconds: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout=seconds)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


def instance_status(env: dict, run_id: str) -> dg.DagsterRunStatus:
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        return instance.get_run_by_id(run_id).status


def run_ids(env: dict) -> list[str]:
    """Every run of the instance, oldest first."""
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        return [r.run_id for r in reversed(instance.get_runs())]


def reference_loss(run_dir: Path, out_dir: Path) -> float:
    """The final train loss of an uninterrupted training of the same resolved config, with the
    same thread count as the asset's ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": str(available_cores()), "MKL_NUM_THREADS": str(available_cores())}
    subprocess.run([sys.executable, "-m", "llm_core.training.train",
                    "--resolved-config", str(run_dir / "resolved_config.json"), "--out-dir", str(out_dir)],
                   check=True, env=env, capture_output=True, timeout=600)
    return json.loads((out_dir / "training_summary.json").read_text())["final_train_loss"]


def ctrl_c_while_training(project, marker: Path) -> None:
    """`scratchllm run --select trained_model` held at step 6, then Ctrl-C: the CLI stops within
    seconds (exit 130, "stopped"), and so does the held rank."""
    proc, log = start(project, "--select", "trained_model", hold="step:6", marker=marker)
    wait_until(marker.exists, proc, what="the hold at step 6")
    rank = held_pid(marker)
    proc.send_signal(signal.SIGINT)
    output = finish(proc, log, timeout=STOP_SECONDS)
    assert proc.returncode == 130 and "stopped" in output.splitlines()[-1], output[-2000:]
    assert gone_within(rank, 5)


def test_kill_9_during_training_then_run_again_resumes_and_ctrl_c_stops_a_sweep(project, tmp_path):
    profile, env, elsewhere = project
    proc, log = start(project, "--select", DATA_ASSETS)  # a comma list, as `dagster asset materialize` takes
    output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]

    # Held after the step-4 checkpoint; a second run on the same data_dir waits for it and says so;
    # SIGTERM stops the waiting one within seconds.
    marker = tmp_path / "held-2"
    killed, killed_log = start(project, "--select", "trained_model", hold="step:6", marker=marker)
    wait_until(marker.exists, killed, what="the hold at step 6")
    rank = held_pid(marker)
    waiting, waiting_log = start(project, "--select", "trained_model")
    wait_until(lambda: "another run is using it" in waiting_log.read_text(), waiting, what="the waiting message")
    waiting.send_signal(signal.SIGTERM)
    output = finish(waiting, waiting_log, timeout=STOP_SECONDS)  # at once: it had no step to let finish
    assert waiting.returncode == 130 and output.splitlines()[-1].endswith("stopped while no step was running"), \
        output[-2000:]
    assert instance_status(env, run_ids(env)[-1]) == dg.DagsterRunStatus.CANCELED
    killed_run = run_ids(env)[-2]

    # kill -9 of the CLI alone, as the OOM killer does: its rank does not train on as an orphan.
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert gone_within(rank, 10)
    assert instance_status(env, killed_run) == dg.DagsterRunStatus.STARTED  # what Dagster leaves behind

    proc, log = start(project, "--select", "trained_model")
    output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    assert f"run {killed_run} (pid {killed.pid}) was still marked STARTED but its process is gone" in output
    assert instance_status(env, killed_run) == dg.DagsterRunStatus.FAILURE
    assert "resumed from" in output and "step_4" in output

    run_dir = next((tmp_path / "data" / "trained_model" / "runs").iterdir())
    resumed = json.loads((run_dir / "training_summary.json").read_text())
    assert resumed["resumed_from_step"] == 4
    assert resumed["final_train_loss"] == pytest.approx(reference_loss(run_dir, tmp_path / "reference"), abs=1e-6)

    # A sweep with training.max_parallel_variants: 2 on the same data: Ctrl-C while a variant is held
    # mid-training stops the CLI and every rank within seconds, the run is not left STARTED, and none
    # trains on as an orphan. (A killed variant resuming: test_sweep.py.)
    values = yaml.safe_load(profile.read_text())
    values["training"]["max_parallel_variants"] = 2
    values["sweep"] = {"training.learning_rate": [1e-3, 2e-3]}
    profile.write_text(yaml.safe_dump(values))
    ctrl_c_while_training(project, tmp_path / "held-3")
    assert instance_status(env, run_ids(env)[-1]) in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.FAILURE)
    # A launcher the step's retry started in the last instant notices that the CLI is gone and
    # takes its ranks down (pipelines/process_group.py): within a second, nothing of this sweep trains.
    of_this_sweep = [p for p in psutil.process_iter(["cmdline"])
                     if str(tmp_path / "data") in " ".join(p.info["cmdline"] or [])]
    _, alive = psutil.wait_procs(of_this_sweep, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing written where the user stands


def test_two_runs_on_one_data_dir_run_one_after_the_other(project, tmp_path):
    profile, env, elsewhere = project
    lock = DirectoryLock(tmp_path / "data", {"holder": "this test"})
    lock.acquire()  # both runs start while the data_dir is busy, so they surely meet
    try:
        first, first_log = start(project, "--select", "raw_corpus,cleaned_shards")
        second, second_log = start(project, "--select", "raw_corpus,cleaned_shards")
        for proc, log in ((first, first_log), (second, second_log)):
            wait_until(lambda: "holder this test" in log.read_text(), proc, what="the waiting message")
    finally:
        lock.release()
    outputs = [finish(first, first_log), finish(second, second_log)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert all("cleaned_shards_invariant: passed" in out for out in outputs)

    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        spans = []
        for run in instance.get_runs():
            records = instance.get_records_for_run(run.run_id, of_type={
                dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}).records
            spans.append((min(r.timestamp for r in records), max(r.timestamp for r in records)))
    (start_a, end_a), (start_b, end_b) = sorted(spans)
    assert end_a <= start_b  # one wrote its shards and manifests, then the other
    assert not list((tmp_path / "data").rglob("*.tmp-*"))


def test_kill_9_of_a_run_from_the_ui_then_launch_again_resumes(project, tmp_path, monkeypatch):
    """The UI path: `dagster dev`, runs launched through GraphQL; the process executing the first
    run is killed -9 mid-training; the next launch marks it failed, takes its pool slot and resumes.
    Then the UI's Terminate stops a third training for good."""
    from pipelines import ui
    from pipelines.cli import prepare_environment

    profile, env, elsewhere = project
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    prepare_environment(None)  # the instance settings `scratchllm ui` writes: pool `training` of 1
    marker = tmp_path / "held"
    for name, value in {**env, "SCRATCHLLM_CONFIG": str(profile), "SCRATCHLLM_HOLD_AT": "step:6",
                        "SCRATCHLLM_HOLD_MARKER": str(marker)}.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    servers = ui.start({"dagster": [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"),
                                    "-h", "127.0.0.1", "-p", str(port)]})
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/server_info")
        first = launch_assets(port, [*DATA_ASSETS.split(","), "trained_model"])
        wait_until(marker.exists, *servers.values(), what="the hold at step 6")
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            worker, _ = run_process(instance, first)
        rank = held_pid(marker)
        os.kill(worker, signal.SIGKILL)  # the process executing the run, as the OOM killer would
        assert gone_within(rank, 10)

        second = launch_assets(port, ["trained_model"])
        wait_until(lambda: run_status(port, second) in ("SUCCESS", "FAILURE", "CANCELED"), *servers.values(),
                   what="the end of the second run", timeout=420)
        assert run_status(port, second) == "SUCCESS" and run_status(port, first) == "FAILURE"
        (run_dir,) = (tmp_path / "data" / "trained_model" / "runs").iterdir()  # the resumed training's

        # "Terminate" in the UI during another training: its rank is gone within 10 s and the run ends
        # CANCELED, not retried (trained_model's retry policy is for killed ranks, not for a user's cancel).
        marker.unlink()
        seeded = {"ops": {"trained_model": {"config": {"training": {"seed": 7}}}}}  # a new training
        third = launch_assets(port, ["trained_model"], seeded)
        wait_until(marker.exists, *servers.values(), what="the hold at step 6 of the third run")
        terminate_run(port, third)
        assert gone_within(held_pid(marker), 10)
        wait_until(lambda: run_status(port, third) in ("SUCCESS", "FAILURE", "CANCELED"), *servers.values(),
                   what="the end of the cancelled run", timeout=60)
        assert run_status(port, third) == "CANCELED"
        assert not any("requested a retry" in m for m in run_messages(port, third))
    finally:
        ui.stop(servers)
    # From the step-4 checkpoint (that a resume reaches the uninterrupted loss: the CLI test above).
    assert json.loads((run_dir / "training_summary.json").read_text())["resumed_from_step"] == 4
