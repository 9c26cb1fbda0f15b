"""MLflow tracking: where runs live, the run of a training, metrics in batches, the loss curve.

This module is the one place that decides where MLflow reads and writes, for every MLflow call of
the project (tracking and model registry alike): the profile's `tracking.uri` (a tracking server of a
team deployment, which keeps the artifacts behind its proxy), else $MLFLOW_TRACKING_URI when it is set,
else sqlite:///<data_dir>/mlflow.db with artifacts in <data_dir>/mlartifacts. Always absolute: MLflow's
own default (sqlite:///<cwd>/mlflow.db) depends on the working directory, and some MLflow calls
(`mlflow.artifacts.download_artifacts("models:/...")`, `mlflow.pyfunc.log_model`) read the
registry from the fluent default even when given a URI, so they run inside `using(uri)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from llm_core.config import ScratchConfig

EXPERIMENT = "scratchllm"
# What MLflow prints that nobody acts on: progress bars of local artifact copies, the system-metrics
# monitor starting and stopping, the tables of a new sqlite store being created.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
for _chatty in ("mlflow.system_metrics.system_metrics_monitor", "mlflow.store.db.utils"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)


def tracking_uri(cfg: ScratchConfig) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cfg.data_path / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_location(cfg: ScratchConfig) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local store under data_dir; a tracking
    server decides for itself (None: its proxied artifact store, mlflow-artifacts:/)."""
    return None if is_server(tracking_uri(cfg)) else (cfg.data_path / "mlartifacts").as_uri()


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """{"model": {"n_layer": 4}} -> {"model.n_layer": "4"}: the config as comparable MLflow params."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def client(uri: str):
    """A client whose tracking store and model registry are both `uri`."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


URI_ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def using(uri: str):
    """Point MLflow's fluent API (tracking and registry) at `uri` for a while, then restore what was
    there: the URIs set in this process and the environment. mlflow.set_tracking_uri also writes
    $MLFLOW_TRACKING_URI, which must not outlive the block; and restoring by setting the variable's old
    value would pin it in the process for good (it would outlive a later change of the variable)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    saved_env = {name: os.environ.get(name) for name in URI_ENV_VARS}
    saved_tracking, saved_registry = tracking_state._tracking_uri, registry_state._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        mlflow.set_registry_uri(saved_registry)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def experiment_id(uri: str, artifacts: str | None, name: str = EXPERIMENT) -> str:
    mlflow_client = client(uri)
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifacts)


def start_training_run(cfg: ScratchConfig, uri: str, tags: dict[str, str], run_name: str | None = None) -> str:
    """Create the MLflow run of a training: params = the whole resolved config, flattened."""
    from mlflow.entities import Param, RunTag

    mlflow_client = client(uri)
    run = mlflow_client.create_run(experiment_id(uri, artifact_location(cfg)), run_name=run_name,
                                   tags={**tags, "mlflow.source.name": "scratchllm trained_model"})
    params = [Param(k, v) for k, v in sorted(flatten(cfg.model_dump(mode="json")).items())]
    for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        mlflow_client.log_batch(run.info.run_id, params=params[i:i + 100])
    mlflow_client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return run.info.run_id


EVALUATION_ARTIFACTS = "evaluation"  # the run's artifact folder of per-document and per-item scores


def log_evaluation(uri: str, run_id: str, metrics: dict[str, float], samples: list[dict],
                   task_metrics: dict[str, float] | None = None, files: list[Path] = ()) -> None:
    """The final evaluation of a training, in its MLflow run: `eval_<name>` metrics, the task metrics
    under their own names (`eval/<task>/acc`, ..., `eval/core`), samples.json, and `files` under
    evaluation/ (the scores that let any two versions be compared later)."""
    from mlflow.entities import Metric

    mlflow_client = client(uri)
    named = {f"eval_{k}": v for k, v in metrics.items()} | (task_metrics or {})
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in named.items()])
    mlflow_client.log_text(run_id, json.dumps(samples, indent=1, ensure_ascii=False), "samples.json")
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), EVALUATION_ARTIFACTS)


def download_evaluation(uri: str, run_id: str, target: Path) -> Path | None:
    """The evaluation/ artifacts of a run (log_evaluation's files) downloaded into target; None if it has none."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory() as tmp, using(uri):
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=EVALUATION_ARTIFACTS,
                                                             dst_path=tmp))
            if not any(local.iterdir()):
                return None
            target.mkdir(parents=True, exist_ok=True)
            for path in local.iterdir():
                os.replace(path, target / path.name)
    except (MlflowException, OSError):
        return None
    return target


class MetricsLogger:
    """Buffers per-step metrics and sends them to MLflow in batches (one sqlite write per flush)."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 50):
        self.client, self.run_id, self.flush_every = client(uri), run_id, flush_every
        self.buffer: list = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self.buffer[i:i + 1000])
        self.buffer = []


def plot_loss_curve(history: list[dict], path: Path) -> Path:
    """train and val loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], label="train", linewidth=1)
    val = [h for h in history if "val_loss" in h]
    ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
