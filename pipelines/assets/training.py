"""trained_model: distributed training launched with `accelerate launch` through Dagster Pipes."""

import dataclasses
import json

import dagster as dg

from llm_core.layout import DATASET_DIR, LATEST_FILE, MODEL_DIR, TOKENIZER_DIR
from llm_core import health, tracking
from llm_core.files import atomic_path, read_json, short_hash, write_json
from llm_core.generate import copy_tokenizer
from llm_core.checkpoint import SUMMARY_FILE
from pipelines.assets.tokenizer import tokenized_dataset
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.lineage import UPSTREAM_OF_TRAINING, data_versions
from pipelines.metadata import loss_curve_plot, uri
from pipelines.resources import MLflowResource, accelerate_command, rank_environment

TrainedModelConfig = run_config_class("TrainedModelConfig", "model", "training")


def training_key(cfg, dataset_version: str) -> str:
    """A training's identity: what it trains (model, training, split) on which data. The same key
    resumes from its checkpoints (a retry, a re-materialization after a kill); a new key trains anew."""
    payload = {"config": cfg.model_dump(mode="json", include={"model", "training", "dataset"}),
               "dataset": dataset_version}
    return short_hash(payload, length=12)


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"}, code_version="1", deps=[tokenized_dataset],
          pool="training", retry_policy=dg.RetryPolicy(max_retries=1),
          check_specs=[dg.AssetCheckSpec(
              "training_health", asset="trained_model", blocking=True,
              description="Every loss is finite and the train loss never stays far above its running median "
                          "(training.health_spike_factor, training.health_spike_steps); otherwise export, "
                          "evaluation and registry are skipped.")])
def trained_model(context: dg.AssetExecutionContext, config: TrainedModelConfig, scratchllm: ScratchllmResource,
                  mlflow: MLflowResource, pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """A Llama-style decoder trained with accelerate (one process per rank), checkpointed and
    resumable; every run is an MLflow run with the full config as params and per-step metrics."""
    cfg = scratchllm.resolve(config)
    dataset_manifest = read_json(cfg.data_path / DATASET_DIR / "manifest.json")
    dataset_version = short_hash(dataset_manifest)
    key = training_key(cfg, dataset_version)
    out_dir = cfg.data_path / MODEL_DIR / "runs" / key
    out_dir.mkdir(parents=True, exist_ok=True)

    uri_ = mlflow.uri(cfg)
    run_file = out_dir / "mlflow_run.json"
    run_id = read_json(run_file).get("run_id")  # a resumed training keeps its MLflow run
    if run_id is None:
        run_id = tracking.start_training_run(cfg, uri_, run_name=f"train-{key}", tags={
            "dagster.run_id": context.run_id, "scratchllm.training_key": key,
            "scratchllm.dataset_version": dataset_version,
            "scratchllm.config_hash": cfg.section_hash("model", "training", "dataset"),
            **data_versions(context.instance, UPSTREAM_OF_TRAINING)})
        write_json(run_file, {"run_id": run_id, "tracking_uri": uri_})
    resolved = out_dir / "resolved_config.json"
    with atomic_path(resolved) as tmp:
        tmp.write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    context.log.info(f"training {key} in {out_dir} (MLflow run {run_id})")

    command = accelerate_command(cfg, "pipelines.train_entry", [
        "--resolved-config", str(resolved), "--out-dir", str(out_dir),
        "--mlflow-run-id", run_id, "--tracking-uri", uri_])
    health.clear_divergence(out_dir)  # only this attempt's divergence may stop the retries
    try:
        result = pipes_subprocess_client.run(context=context, command=command, env=rank_environment(cfg))
    except Exception:
        diverged = health.divergence(out_dir)
        if diverged:  # a retry would resume from the last good checkpoint and diverge the same way
            raise dg.Failure(description=diverged["message"], allow_retries=False,
                             metadata={"step": diverged["step"], **uri(out_dir)}) from None
        raise
    materialization = result.get_materialize_result()
    copy_tokenizer(cfg.data_path / TOKENIZER_DIR, out_dir)  # the run directory now stands alone
    verdict = health.assess(read_json(out_dir / SUMMARY_FILE)["history"], cfg.training)
    if verdict.passed:  # an unhealthy model never becomes the one that export, evaluation and registry take
        write_json(cfg.data_path / MODEL_DIR / LATEST_FILE,
                   {"key": key, "path": str(out_dir), "mlflow_run_id": run_id, "tracking_uri": uri_})
    health_check = dg.AssetCheckResult(check_name="training_health", passed=verdict.passed, metadata={
        "details": verdict.description,
        **{k: v for k, v in dataclasses.asdict(verdict).items()
           if k not in ("passed", "description") and v is not None}})
    return dg.MaterializeResult(
        metadata={**materialization.metadata, **uri(out_dir), "mlflow_run_id": run_id, "training_key": key,
                  "loss_curve_plot": loss_curve_plot(out_dir / "loss_curve.png",
                                                     tracking.experiment_id(uri_, tracking.artifact_location(cfg)),
                                                     run_id)},
        data_version=dg.DataVersion(key),
        check_results=[health_check],
    )


training_assets = [trained_model]
