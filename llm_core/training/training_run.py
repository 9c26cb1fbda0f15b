"""The bookkeeping of one training around its loop: its identity, its run directory, its MLflow run,
the resolved config its ranks read, and what a finished training leaves to the next stages.

A training's identity (the training key) is a hash of what it trains (the model, training and
dataset sections) and of the tokenized data: the same key resumes from its checkpoints and keeps
its MLflow run (a retry, a re-materialization after a kill); a new key trains anew.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llm_core.training import health, model_source
from llm_core import tracking
from llm_core.model_files import MODEL_CONFIG_FILE, SUMMARY_FILE
from llm_core.config import ScratchConfig, training_tokens
from llm_core.files import atomic_path, read_json, short_hash, write_json
from llm_core.model_files import copy_tokenizer
from llm_core.layout import DATASET_DIR, LATEST_FILE, MODEL_DIR, MODEL_TOKENIZER_SUBDIR, TOKENIZER_DIR

MLFLOW_RUN_FILE = "mlflow_run.json"
PARENT_TAG, PARENT_RUN_TAG = "scratchllm.parent", "scratchllm.parent_run_id"  # a warm start's source
RESOLVED_CONFIG_FILE = "resolved_config.json"


@dataclasses.dataclass
class TrainingRun:
    key: str
    out_dir: Path  # <data_dir>/trained_model/runs/<key> (a chat fine-tune's: chat_model/runs/<key>)
    mlflow_run_id: str
    tracking_uri: str
    dataset_dir: Path | None = None  # None: the profile's tokenized_dataset; else an sft_dataset

    @property
    def resolved_config(self) -> Path:
        return self.out_dir / RESOLVED_CONFIG_FILE

    def entry(self) -> dict:
        """As latest.json and a sweep record hold it."""
        return {"key": self.key, "path": str(self.out_dir), "mlflow_run_id": self.mlflow_run_id,
                "tracking_uri": self.tracking_uri}

    def entry_args(self) -> list[str]:
        """The arguments of the training entry point (pipelines/train_entry.py) on every rank."""
        return ["--resolved-config", str(self.resolved_config), "--out-dir", str(self.out_dir),
                "--mlflow-run-id", self.mlflow_run_id, "--tracking-uri", self.tracking_uri,
                *(["--dataset-dir", str(self.dataset_dir)] if self.dataset_dir else [])]


def training_key(cfg: ScratchConfig, dataset_version: str) -> str:
    payload = {"config": cfg.identity("model", "training", "dataset"),
               "dataset": dataset_version}
    return short_hash(payload, length=12)


def dataset_version(cfg: ScratchConfig, dataset_dir: Path | None = None) -> str:
    """The identity of the tokenized data a training reads (the profile's tokenized_dataset, or `dataset_dir`)."""
    return short_hash(read_json(Path(dataset_dir or cfg.data_path / DATASET_DIR) / "manifest.json"))


# More passes than this over the training split and a small model mostly memorizes it.
MANY_PASSES = 20


def repetition_warning(cfg: ScratchConfig) -> str | None:
    """A warning when the training would read its training split many times over (a small corpus)."""
    train_tokens = read_json(cfg.data_path / DATASET_DIR / "manifest.json").get("split", {}).get("train_tokens")
    t, planned = cfg.training, training_tokens(cfg)
    if not train_tokens or planned < MANY_PASSES * train_tokens:
        return None
    return (f"training: {t.max_steps} steps read {planned / 1e6:.2f}M tokens, {planned / train_tokens:.0f} passes "
            f"over the {train_tokens:,} tokens of the training split: expect the model to memorize them (the "
            f"validation loss rises); add text to corpus.sources, or lower training.max_steps")


def mixture_tags(model_dir: Path) -> dict[str, str]:
    """Registry tags: the mixture a model was trained with (`natural`: by size) and the tokens per source."""
    trained = read_json(Path(model_dir) / MODEL_CONFIG_FILE).get("config", {}).get("training", {})
    tokens = read_json(Path(model_dir) / SUMMARY_FILE).get("tokens_per_source")
    return {"scratchllm.mixture": json.dumps(trained["mixture"]) if trained.get("mixture") else "natural",
            **({"scratchllm.tokens_per_source": json.dumps(tokens)} if tokens else {})}


def prepare(cfg: ScratchConfig, tracking_uri: str, tags: dict[str, str], dataset_dir: Path | None = None,
            models_dir: str = MODEL_DIR) -> TrainingRun:
    """The run directory and MLflow run of the training `cfg` describes (created, or found again to
    resume), with the resolved config written for the ranks. `tags` go on a new MLflow run. A chat
    fine-tune: `dataset_dir` its sft_dataset, `models_dir` chat_model.

    A warm start from a registered model is resolved here, once: the ranks get the downloaded
    directory, the training key follows the version (a new champion is a new training), and the
    MLflow run records the parent version and run."""
    warm = model_source.resolve_init_from(cfg)
    if warm:
        cfg = cfg.model_copy(deep=True)
        cfg.training.init_from = str(warm.model_dir)
        tags = {PARENT_TAG: warm.registered_version or warm.spec,  # unless the caller names the parent
                **({PARENT_RUN_TAG: warm.registered_run_id} if warm.registered_run_id else {}), **tags}
    data_version = dataset_version(cfg, dataset_dir)
    key = training_key(cfg, data_version)
    out_dir = cfg.data_path / models_dir / "runs" / key
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = read_json(out_dir / MLFLOW_RUN_FILE).get("run_id")  # a resumed training keeps its MLflow run
    if run_id is None:
        run_id = tracking.start_training_run(cfg, tracking_uri, run_name=f"train-{key}", tags={
            **tags, "scratchllm.training_key": key, "scratchllm.dataset_version": data_version,
            "scratchllm.config_hash": cfg.section_hash("model", "training", "dataset")})
        write_json(out_dir / MLFLOW_RUN_FILE, {"run_id": run_id, "tracking_uri": tracking_uri})
    run = TrainingRun(key, out_dir, run_id, tracking_uri, dataset_dir)
    with atomic_path(run.resolved_config) as tmp:
        tmp.write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    health.clear_divergence(out_dir)  # only this attempt's divergence may stop the retries
    return run


def continue_from_champion(cfg: ScratchConfig, tracking_uri: str, log) -> ScratchConfig:
    """`automation.retrain_mode: continue`: the config with `training.init_from` the registered champion
    (unless init_from is set already; from scratch while there is no champion yet)."""
    from llm_core.registry import versions

    name = cfg.registry.model_name
    if cfg.training.init_from or cfg.automation.retrain_mode != "continue":
        return cfg
    if versions.champion(tracking.client(tracking_uri), name) is None:
        log(f"retrain_mode continue: no {name}@champion registered yet, training from scratch")
        return cfg
    log(f"retrain_mode continue: warm start from {name}@champion")
    cfg = cfg.model_copy(deep=True)
    cfg.training.init_from = f"{name}@champion"
    return cfg


def publish_if_healthy(cfg: ScratchConfig, run: TrainingRun, models_dir: str = MODEL_DIR) -> health.Health:
    """After the ranks are done: the run directory gets its tokenizer (it then stands alone), its loss
    history is judged (the training_health check's verdict, returned), and a healthy model becomes the
    latest one, which evaluation, registry and export take. An unhealthy one never does."""
    copy_tokenizer(run.dataset_dir / MODEL_TOKENIZER_SUBDIR if run.dataset_dir else cfg.data_path / TOKENIZER_DIR,
                   run.out_dir)
    verdict = health.assess(read_json(run.out_dir / SUMMARY_FILE)["history"], cfg.training)
    if verdict.passed:
        make_latest(cfg, run, models_dir)
    return verdict


def make_latest(cfg: ScratchConfig, run: TrainingRun, models_dir: str = MODEL_DIR) -> None:
    """The model that evaluation, registry and export take next."""
    write_json(cfg.data_path / models_dir / LATEST_FILE, run.entry())
