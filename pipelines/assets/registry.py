"""registered_model: the evaluated model as a version in the MLflow model registry, with lineage
tags, and the `champion` alias moved only when it is at least as good as the current champion."""

from pathlib import Path

import dagster as dg

from llm_core import evaluate, registry, tracking, training_run
from llm_core.checkpoint import latest_model
from llm_core.files import read_json
from llm_core.layout import MODEL_TOKENIZER_SUBDIR
from pipelines.assets.evaluation import model_evaluation
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.lineage import data_versions
from pipelines.resources import MLflowResource

RegisteredModelConfig = run_config_class("RegisteredModelConfig", "registry")


@dg.asset(group_name="evaluation", kinds={"mlflow"}, code_version="1", deps=[model_evaluation],
          check_specs=[dg.AssetCheckSpec(
              "beats_champion", asset="registered_model", blocking=True,
              description="The new version's val bits per byte is at least as good as the current champion's; "
                          "only then does the `champion` alias move (otherwise the version is the `challenger`).")])
def registered_model(context: dg.AssetExecutionContext, config: RegisteredModelConfig, scratchllm: ScratchllmResource,
                     mlflow: MLflowResource):
    """The latest trained model as an MLflow pyfunc that generates text, registered under
    `registry.model_name`; `models:/<name>@champion` is the best one so far."""
    cfg = scratchllm.resolve(config)
    latest = latest_model(cfg)
    report = read_json(evaluate.report_path(cfg, latest["key"]))
    if "val_bpb" not in report:
        raise FileNotFoundError(f"no evaluation of training {latest['key']}: materialize `model_evaluation` first")
    tracking_uri = latest.get("tracking_uri") or mlflow.uri(cfg)
    tags = {registry.KEY_TAG: latest["key"], "dagster.run_id": context.run_id,
            "config_hash": cfg.config_hash(),
            "code_version": registry.code_version(), **data_versions(context.instance)}
    run_tags = tracking.client(tracking_uri).get_run(latest["mlflow_run_id"]).data.tags
    tags.update({k: run_tags[k] for k in (training_run.PARENT_TAG, training_run.PARENT_RUN_TAG) if k in run_tags})
    model_dir = Path(latest["path"])
    r = registry.register(model_dir, model_dir / MODEL_TOKENIZER_SUBDIR, tracking_uri=tracking_uri,
                          run_id=latest["mlflow_run_id"], name=cfg.registry.model_name, val_bpb=report["val_bpb"],
                          tags=tags)
    champion = (f"version {r.previous_champion} ({r.previous_champion_bpb:.4f} bits/byte)"
                if r.previous_champion else "none yet")
    verdict = "`champion` moves to it" if r.promoted else "the champion stays; this version is the `challenger`"
    context.log.info(f"{r.name} version {r.version}: {r.val_bpb:.4f} bits/byte; champion before: {champion}; "
                     f"{'champion' if r.promoted else 'challenger'}")
    yield dg.MaterializeResult(metadata={
        "model_name": r.name, "model_version": int(r.version), "alias": r.alias, "val_bpb": r.val_bpb,
        "model_uri": f"models:/{r.name}@{r.alias}", "mlflow_run_id": latest["mlflow_run_id"],
        "reused_version": r.reused, "tracking_uri": tracking_uri, **{k: v for k, v in tags.items() if v}})
    yield dg.AssetCheckResult(
        check_name="beats_champion", passed=r.promoted, severity=dg.AssetCheckSeverity.WARN,
        metadata={"val_bpb": r.val_bpb, "champion_before": champion,
                  "details": f"{r.val_bpb:.4f} bits/byte vs champion {champion}: "
                             f"{verdict if r.previous_champion else 'first version, becomes champion'}"})


registry_assets = [registered_model]
