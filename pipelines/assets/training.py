"""trained_model: distributed training launched with `accelerate launch` through Dagster Pipes."""

import dataclasses

import dagster as dg

from llm_core import health, tracking, training_run
from pipelines.assets.tokenizer import tokenized_dataset
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.lineage import UPSTREAM_OF_TRAINING, data_versions
from pipelines.metadata import loss_curve_plot, uri
from pipelines.resources import MLflowResource, accelerate_command, rank_environment

TrainedModelConfig = run_config_class("TrainedModelConfig", "model", "training")


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
    if context.run.job_name == "retrain":  # the schedule and the new-data sensor: maybe from the champion
        cfg = training_run.continue_from_champion(cfg, mlflow.uri(cfg), context.log.info)
    run = training_run.prepare(cfg, mlflow.uri(cfg), tags={
        "dagster.run_id": context.run_id, **data_versions(context.instance, UPSTREAM_OF_TRAINING)})
    context.log.info(f"training {run.key} in {run.out_dir} (MLflow run {run.mlflow_run_id})")
    command = accelerate_command(cfg, "pipelines.train_entry", run.entry_args())
    try:
        result = pipes_subprocess_client.run(context=context, command=command, env=rank_environment(cfg))
    except Exception:
        diverged = health.divergence(run.out_dir)
        if diverged:  # a retry would resume from the last good checkpoint and diverge the same way
            raise dg.Failure(description=diverged["message"], allow_retries=False,
                             metadata={"step": diverged["step"], **uri(run.out_dir)}) from None
        raise
    verdict = training_run.finish(cfg, run)
    experiment = tracking.experiment_id(run.tracking_uri, tracking.artifact_location(cfg))
    return dg.MaterializeResult(
        metadata={**result.get_materialize_result().metadata, **uri(run.out_dir), "mlflow_run_id": run.mlflow_run_id,
                  "training_key": run.key,
                  "loss_curve_plot": loss_curve_plot(run.out_dir / "loss_curve.png", experiment, run.mlflow_run_id)},
        data_version=dg.DataVersion(run.key),
        check_results=[dg.AssetCheckResult(check_name="training_health", passed=verdict.passed, metadata={
            "details": verdict.description,
            **{k: v for k, v in dataclasses.asdict(verdict).items()
               if k not in ("passed", "description") and v is not None}})],
    )


training_assets = [trained_model]
