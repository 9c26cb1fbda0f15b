"""llm_core.tracking on a real MLflow sqlite store: where runs live, the run of a training with its
config as params, batched metrics, and `using` leaving MLflow's fluent API and environment as it was."""

import os

import mlflow
import pytest
from helpers import CI_PROFILE

from llm_core import tracking
from llm_core.config import load_config


@pytest.fixture
def cfg(tmp_path):
    return load_config(CI_PROFILE, {"data_dir": str(tmp_path / "data")})


def test_flatten_nests_with_dots_and_stringifies():
    assert tracking.flatten({"model": {"n_layer": 4, "rope": {"theta": 1e4}}, "seed": 0, "sources": ["a", "b"]}) == {
        "model.n_layer": "4", "model.rope.theta": "10000.0", "seed": "0", "sources": "['a', 'b']"}
    assert len(tracking.flatten({"long": "x" * 10_000})["long"]) == 6000  # MLflow's limit for a param value


def test_tracking_uri_is_absolute_under_data_dir_unless_the_environment_names_one(cfg, monkeypatch):
    assert tracking.tracking_uri(cfg) == f"sqlite:///{cfg.data_path / 'mlflow.db'}"
    assert cfg.data_path.is_absolute()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:5000"


@pytest.mark.parametrize("env_before", [None, "sqlite:////elsewhere/mlflow.db"], ids=["unset", "set"])
def test_using_points_mlflow_at_a_uri_and_restores_everything(tmp_path, monkeypatch, env_before):
    if env_before:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_before)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", env_before)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(KeyError):  # restored even when the block fails
        with tracking.using(uri):
            assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (uri, uri)
            raise KeyError("inside")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    assert os.environ.get("MLFLOW_REGISTRY_URI") == env_before
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # nothing was pinned: MLflow follows the variable
    assert mlflow.get_tracking_uri() != "sqlite:////elsewhere/mlflow.db"


def test_a_training_run_holds_the_whole_config_and_its_metrics(cfg):
    uri = tracking.tracking_uri(cfg)
    run_id = tracking.start_training_run(cfg, uri, tags={"scratchllm.key": "abc"}, run_name="tiny")
    client = tracking.client(uri)
    run = client.get_run(run_id)
    params = tracking.flatten(cfg.model_dump(mode="json"))
    assert run.data.params == params and params["training.learning_rate"] == str(cfg.training.learning_rate)
    assert run.data.tags["scratchllm.key"] == "abc" and run.info.run_name == "tiny"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == tracking.EXPERIMENT and experiment.artifact_location == tracking.artifact_location(cfg)
    assert tracking.experiment_id(uri, tracking.artifact_location(cfg)) == run.info.experiment_id  # found, not re-made

    log = tracking.MetricsLogger(uri, run_id, flush_every=50)
    for step in range(1, 31):
        log(step, {"train_loss": 1.0 / step, "lr": 0.1})
    # sent when 50 are buffered (step 25); steps 26-30 wait for the next flush
    assert len(client.get_metric_history(run_id, "train_loss")) == 25
    log.flush()
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 31)]


def test_no_mlflow_telemetry_leaves_a_scratchllm_process_or_its_children(tmp_path):
    """MLflow 3 phones home by default (outside CI); a user's `make run` must not. A newcomer's shell:
    no CI or pytest variables (either turns MLflow's telemetry off by itself)."""
    import subprocess
    import sys

    from llm_core.config import PROJECT_ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_CURRENT_TEST", "MLFLOW_DISABLE_TELEMETRY")}
    probe = ("import subprocess, sys, pipelines.definitions\n"
             "from mlflow.telemetry.utils import is_telemetry_disabled\n"
             "child = subprocess.run([sys.executable, '-c', 'from mlflow.telemetry.utils import is_telemetry_disabled;"
             " print(is_telemetry_disabled())'], capture_output=True, text=True).stdout.strip()\n"
             "print(is_telemetry_disabled(), child)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True"]
