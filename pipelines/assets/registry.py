"""registered_model: the evaluated model as a version in the MLflow model registry, with lineage
tags, and the `champion` alias moved only when it beats the current champion beyond noise
(llm_core/evaluation/promotion.py)."""

from pathlib import Path

import dagster as dg

from llm_core.evaluation import promotion
from llm_core.registry import model_card
from llm_core import tracking
from llm_core.training import training_run
from llm_core.model_files import latest_model
from llm_core.files import read_json
from llm_core.layout import MODEL_TOKENIZER_SUBDIR
from pipelines.assets.evaluation import model_evaluation
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.failures import user_errors
from pipelines.lineage import data_versions
from pipelines.metadata import markdown_table
from pipelines.resources import MLflowResource

RegisteredModelConfig = run_config_class("RegisteredModelConfig", "registry")


@dg.asset(group_name="evaluation", kinds={"mlflow"}, code_version="1", deps=[model_evaluation],
          check_specs=[dg.AssetCheckSpec(
              "beats_champion", asset="registered_model", blocking=True,
              description="The new version is better than the current champion in val bits per byte by more "
                          "than registry.promotion_margin_bpb, with the whole paired bootstrap interval over "
                          "validation documents beyond it, and no task worse beyond its noise; only then does "
                          "the `champion` alias move (otherwise the version is the `challenger`).")])
@user_errors
def registered_model(context: dg.AssetExecutionContext, config: RegisteredModelConfig, scratchllm: ScratchllmResource,
                     mlflow: MLflowResource):
    """The latest trained model as an MLflow pyfunc that generates text, registered under
    `registry.model_name`; `models:/<name>@champion` is the best one so far."""
    from llm_core.evaluation import evaluate
    from llm_core.registry import versions

    cfg = scratchllm.resolve(config)
    latest = latest_model(cfg)
    report = read_json(evaluate.report_path(cfg, latest["key"]))
    if "val_bpb" not in report:
        raise FileNotFoundError(f"no evaluation of training {latest['key']}: materialize `model_evaluation` first")
    tracking_uri = latest.get("tracking_uri") or mlflow.uri(cfg)
    tags = {versions.KEY_TAG: latest["key"], "dagster.run_id": context.run_id,
            "config_hash": cfg.config_hash(),
            "code_version": versions.code_version(), **data_versions(context.instance)}
    run_tags = tracking.client(tracking_uri).get_run(latest["mlflow_run_id"]).data.tags
    tags.update({k: run_tags[k] for k in (training_run.PARENT_TAG, training_run.PARENT_RUN_TAG) if k in run_tags})
    model_dir = Path(latest["path"])
    tags.update(training_run.mixture_tags(model_dir))
    verdict = promotion.against_champion(cfg, tracking_uri, latest["key"], report["val_bpb"])
    r = versions.register(model_dir, model_dir / MODEL_TOKENIZER_SUBDIR, tracking_uri=tracking_uri,
                          run_id=latest["mlflow_run_id"], name=cfg.registry.model_name, val_bpb=report["val_bpb"],
                          tags=tags, verdict=verdict, card=model_card.render(cfg, model_dir, report, verdict))
    champion = (f"version {r.previous_champion} ({r.previous_champion_bpb:.4f} bits/byte)"
                if r.previous_champion else "none yet")
    outcome = ("first version, becomes champion" if not r.previous_champion else
               "`champion` moves to it" if r.promoted else "the champion stays; this version is the `challenger`")
    context.log.info(f"{r.name} version {r.version}: {r.val_bpb:.4f} bits/byte; champion before: {champion}; "
                     f"{'champion' if r.promoted else 'challenger'}")
    yield dg.MaterializeResult(metadata={
        "model_name": r.name, "model_version": int(r.version), "alias": r.alias, "val_bpb": r.val_bpb,
        "model_uri": f"models:/{r.name}@{r.alias}", "mlflow_run_id": latest["mlflow_run_id"],
        "reused_version": r.reused, "tracking_uri": tracking_uri, **{k: v for k, v in tags.items() if v}})
    yield dg.AssetCheckResult(
        check_name="beats_champion", passed=r.promoted, severity=dg.AssetCheckSeverity.WARN,
        metadata={"val_bpb": r.val_bpb, "champion_before": champion, **verdict_metadata(verdict),
                  "details": f"{r.val_bpb:.4f} bits/byte vs champion {champion}: {outcome}"
                             + (f" ({verdict.reason})" if verdict else "")})


def verdict_metadata(verdict: promotion.Verdict | None) -> dict:
    if verdict is None:
        return {}
    return {"delta_bpb": verdict.delta_bpb, "interval_low": verdict.low, "interval_high": verdict.high,
            "confidence": verdict.confidence, "margin_bpb": verdict.margin, "paired_documents": verdict.num_documents,
            **({"task_deltas": markdown_table(
                ["task", "items", "acc_norm change", "interval"],
                [[t.task, t.items, f"{t.delta:+.4f}", f"[{t.low:+.4f}, {t.high:+.4f}]"] for t in verdict.task_deltas])}
               if verdict.task_deltas else {}),
            **({"protected_sources": markdown_table(
                ["source", "documents", "bits/byte change", "interval"],
                [[d.source, d.documents, f"{d.delta:+.5f}", f"[{d.low:+.5f}, {d.high:+.5f}]"]
                 for d in verdict.source_deltas])} if verdict.source_deltas else {})}


registry_assets = [registered_model]
