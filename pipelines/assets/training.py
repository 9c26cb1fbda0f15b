"""trained_model: distributed training launched with `accelerate launch` through Dagster Pipes."""

import dataclasses

import dagster as dg

from llm_core import tracking
from llm_core.config import ScratchConfig, variants
from llm_core.experiments import sweep
from llm_core.training import health, training_run
from llm_core.training.mixture import check_mixture
from pipelines.assets.tokenizer import tokenized_dataset
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.failures import user_errors
from pipelines.lineage import UPSTREAM_OF_TRAINING, data_versions
from pipelines.metadata import loss_curve_plot, markdown_table, uri
from pipelines.resources import (Finished, MLflowResource, launch_command, run_side_by_side, slot_environments,
                                 visible_gpus, with_warm_start)

TrainedModelConfig = run_config_class("TrainedModelConfig", "model", "training")


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"}, code_version="1", deps=[tokenized_dataset],
          pool="training", retry_policy=dg.RetryPolicy(max_retries=1),
          check_specs=[dg.AssetCheckSpec(
              "training_health", asset="trained_model", blocking=True,
              description="Every loss is finite and the train loss never stays far above its running median "
                          "(training.health_spike_factor, training.health_spike_steps); otherwise export, "
                          "evaluation and registry are skipped.")])
@user_errors
def trained_model(context: dg.AssetExecutionContext, config: TrainedModelConfig, scratchllm: ScratchllmResource,
                  mlflow: MLflowResource) -> dg.MaterializeResult:
    """A Llama-style decoder trained with accelerate (one process per rank), checkpointed and
    resumable; every run is an MLflow run with the full config as params and per-step metrics.
    With a `sweep:` in the profile, one training per variant (training.max_parallel_variants at
    once), as child runs of one MLflow parent run; finished variants are reused."""
    cfg = scratchllm.resolve(config)
    cfg = with_warm_start(context, cfg, mlflow.uri(cfg))
    if warning := training_run.repetition_warning(cfg):
        context.log.warning(warning)
    for variant in variants(cfg):  # an impossible mixture is refused before any training starts
        for p in check_mixture(variant.config) if variant.config.training.mixture else []:
            context.log.info(f"{variant.name} mixture: {p.source} weight {p.weight:.3f}, {p.planned_tokens:,} of "
                             f"{p.train_tokens:,} training tokens ({p.repetitions:.2f} passes)")
    tags = {"dagster.run_id": context.run_id, **data_versions(context.instance, UPSTREAM_OF_TRAINING)}
    if cfg.sweep:
        return train_sweep(context, cfg, mlflow.uri(cfg), tags)
    run = training_run.prepare(cfg, mlflow.uri(cfg), tags=tags)
    context.log.info(f"training {run.key} in {run.out_dir} (MLflow run {run.mlflow_run_id})")
    finished = []
    launch(context, {run.key: (cfg, run)}, slots=1, on_exit=finished.append)
    if failure := training_failure(finished[0], run):
        raise failure
    verdict = training_run.publish_if_healthy(cfg, run)
    experiment = tracking.experiment_id(run.tracking_uri, tracking.artifact_location(cfg))
    return dg.MaterializeResult(
        metadata={**finished[0].reported, **uri(run.out_dir), "mlflow_run_id": run.mlflow_run_id,
                  "training_key": run.key,
                  "loss_curve_plot": loss_curve_plot(run.out_dir / "loss_curve.png", experiment, run.mlflow_run_id)},
        data_version=dg.DataVersion(run.key),
        check_results=[dg.AssetCheckResult(check_name="training_health", passed=verdict.passed, metadata={
            "details": verdict.description,
            **{k: v for k, v in dataclasses.asdict(verdict).items()
               if k not in ("passed", "description") and v is not None}})],
    )


def launch(context: dg.AssetExecutionContext, trainings: dict[str, tuple[ScratchConfig, training_run.TrainingRun]],
           slots: int, on_exit) -> None:
    """`accelerate launch` of every training through Dagster Pipes, `slots` at once (a single training
    is one slot; side by side, each slot has devices or cores of its own and its own rendezvous port);
    on_exit(Finished) as each ends, with the metadata its rank 0 reported."""
    configs = [cfg for cfg, _ in trainings.values()]
    environments = slot_environments(configs, slots, visible_gpus() if slots > 1 else [])
    jobs = [(name, cfg, launch_command(cfg, "pipelines.train_entry", run.entry_args(), free_port=slots > 1))
            for name, (cfg, run) in trainings.items()]
    run_side_by_side(context, jobs, environments, on_exit)


def training_failure(finished: Finished, run: training_run.TrainingRun) -> dg.Failure | None:
    """Why a training failed, when it did: a divergence fails without retries (a retry would resume from
    the last good checkpoint and diverge the same way); a kill or a crash may be retried (it resumes)."""
    if finished.exit_code == 0:
        return None
    diverged = health.divergence(run.out_dir)
    if diverged:
        return dg.Failure(description=diverged["message"], allow_retries=False,
                          metadata={"step": diverged["step"], **uri(run.out_dir)})
    from llm_core.training import cluster

    if why := cluster.failure(run.out_dir):  # no cluster, no room, or Ray Train gave up (its budget spent)
        return dg.Failure(description=why, allow_retries=False, metadata=uri(run.out_dir))
    return dg.Failure(description=f"training {finished.name} ended with exit code {finished.exit_code} (killed or "
                                  f"crashed; see the log above): a retry or a re-run resumes it from its last "
                                  f"checkpoint", metadata=uri(run.out_dir))


def train_sweep(context: dg.AssetExecutionContext, cfg, tracking_uri: str, tags: dict) -> dg.MaterializeResult:
    """Every variant of the sweep (all validated first), training.max_parallel_variants at a time; a
    variant that diverges or is unhealthy is recorded and the sweep goes on. The check passes when
    one variant is healthy. A variant that failed otherwise fails the step once the others are done."""
    variants = {v.name: v for v in sweep.variants(cfg)}
    record = sweep.start(cfg, tracking_uri, training_run.dataset_version(cfg), tags)
    context.log.info(f"sweep {record['name']}: {len(variants)} variants (MLflow parent run {record['parent_run_id']})")
    runs = {}
    for variant in variants.values():
        runs[variant.name] = training_run.prepare(variant.config, tracking_uri, tags={
            **tags, "mlflow.parentRunId": record["parent_run_id"], "scratchllm.variant": variant.name})
        sweep.adopt(record, runs[variant.name].mlflow_run_id, variant.name)
    to_train = [v for v in variants.values() if not sweep.fully_trained(runs[v.name].out_dir, v.config)]
    statuses, failed = {v.name: "reused" for v in variants.values() if v not in to_train}, []

    def record_variant(finished: Finished) -> None:
        """As each training ends (a reused one as if it had just ended well)."""
        name = finished.name
        variant, run = variants[name], runs[name]
        failure = training_failure(finished, run)
        if failure and failure.allow_retries:  # killed, out of memory...: a re-run resumes it
            failed.append(f"{name} (exit code {finished.exit_code})")
            return
        if finished.reported:  # what it measured (tokens/s, MFU, peak memory, plan vs measured) in Dagster
            context.log_event(dg.AssetObservation(asset_key="trained_model", metadata={
                "variant": name, "values": variant.label, **finished.reported}))
        diverged = failure.description if failure else None
        statuses[name] = f"diverged: {diverged}" if diverged else statuses.get(name, "trained")
        if diverged:
            healthy, health_text = False, statuses[name]
        else:
            verdict = training_run.publish_if_healthy(variant.config, run)
            healthy, health_text = verdict.passed, "healthy" if verdict.passed else verdict.description
        record["variants"][name] = {
            "values": variant.values, "label": variant.label, "key": run.key, "path": str(run.out_dir),
            "mlflow_run_id": run.mlflow_run_id, "healthy": healthy, "status": statuses[name], "health": health_text}
        record["variants"] = {n: record["variants"][n] for n in variants if n in record["variants"]}  # sweep order
        sweep.save(cfg, record)

    for name in list(statuses):  # the reused ones
        record_variant(Finished(name, 0, {}))
    slots = min(cfg.training.max_parallel_variants, len(to_train)) or 1
    if slots > 1:
        to_train.sort(key=lambda v: -sweep.training_flops(v.config))  # biggest first
    for variant in to_train:
        context.log.info(f"sweep {record['name']} {variant.name}: {variant.label}")
    launch(context, {v.name: (v.config, runs[v.name]) for v in to_train}, slots, record_variant)
    if failed:
        raise RuntimeError(f"sweep {record['name']}: {', '.join(failed)} failed; the other variants are kept and "
                           f"a re-run resumes the failed ones")
    rows = [[name, v["label"], v["key"], v["status"].split(":")[0], v["health"]]
            for name, v in record["variants"].items()]
    healthy = [name for name, v in record["variants"].items() if v["healthy"]]
    return dg.MaterializeResult(
        metadata={"sweep": record["name"], "mlflow_parent_run_id": record["parent_run_id"],
                  "num_variants": len(variants), "num_trained": sum(r[3] == "trained" for r in rows),
                  "num_reused": sum(r[3] == "reused" for r in rows), "variants_at_once": slots,
                  "variants": markdown_table(["variant", "values", "training key", "this run", "health"], rows)},
        data_version=dg.DataVersion(record["key"]),
        check_results=[dg.AssetCheckResult(check_name="training_health", passed=bool(healthy), metadata={
            "details": f"{len(healthy)} of {len(variants)} variants healthy: {', '.join(healthy) or 'none'}"})],
    )


training_assets = [trained_model]
