"""model_evaluation: validation loss, perplexity, bits per byte and samples of the trained model,
logged to the training's MLflow run."""

import dagster as dg

from llm_core.experiments import sweep
from llm_core.files import read_json
from pipelines.assets.training import trained_model
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.failures import user_errors
from pipelines.metadata import markdown_table, uri
from pipelines.resources import MLflowResource

ModelEvaluationConfig = run_config_class("ModelEvaluationConfig", "evaluation")


@dg.asset(group_name="evaluation", kinds={"pytorch", "mlflow"}, code_version="1", deps=[trained_model])
@user_errors
def model_evaluation(context: dg.AssetExecutionContext, config: ModelEvaluationConfig,
                     scratchllm: ScratchllmResource, mlflow: MLflowResource) -> dg.MaterializeResult:
    """Loss, perplexity and bits per byte on the validation split (at most evaluation.max_val_tokens of
    it: a fixed sample of whole documents), kept per document for paired comparisons; the multiple-choice
    `evaluation.tasks` (accuracy, length-normalized and centered; `core` their mean), and seeded
    sample generations for `evaluation.prompts`."""
    from llm_core.evaluation import evaluate as ev

    cfg = scratchllm.resolve(config)
    if cfg.sweep:
        return evaluate_sweep(context, cfg, mlflow.uri(cfg))
    evaluation = ev.evaluate_latest(cfg, mlflow.uri(cfg))
    r = evaluation.result
    context.log.info(f"val loss {r.val_loss:.4f}, perplexity {r.perplexity:.1f}, {r.val_bpb:.3f} bits/byte")
    for name in r.unchecked_tasks:
        context.log.warning(f"task {name} was not checked for contamination: list it in the profile's "
                            f"evaluation.tasks and materialize tokenized_dataset again")
    tasks = {}
    if r.tasks:
        tasks = {"core": r.core, "task_scores": markdown_table(
            ["task", "items", "acc", "acc_norm", "random", "centered", "decontaminated"],
            [[t.name, t.items, f"{t.acc:.3f}", f"{t.acc_norm:.3f}", f"{t.random:.3f}", f"{t.centered:+.3f}",
              "no" if t.name in r.unchecked_tasks else "yes"] for t in r.tasks])}
    per_source = {"per_source_bpb": markdown_table(
        ["source", "bits per byte", "documents", "bytes"],
        [[name, f"{s['bpb']:.4f}", s["documents"], s["bytes"]] for name, s in r.per_source.items()]),
        **ev.source_metrics(r.per_source)}
    return dg.MaterializeResult(
        metadata={**uri(evaluation.report), **tasks, **per_source, "val_loss": r.val_loss, "val_bpb": r.val_bpb,
                  "perplexity": r.perplexity, "num_val_tokens": r.num_val_tokens,
                  "num_val_documents": r.num_val_documents, "val_tokens_per_second": round(r.val_tokens_per_second),
                  "mlflow_run_id": evaluation.latest["mlflow_run_id"],
                  "samples": markdown_table(["prompt", "completion"],
                                            [[s["prompt"], s["completion"]] for s in r.samples], max_cell=400)},
    )


def evaluate_sweep(context: dg.AssetExecutionContext, cfg, tracking_uri: str) -> dg.MaterializeResult:
    """Every healthy variant of the sweep evaluated; the best one by val bits per byte goes on to the registry."""
    from llm_core.evaluation import evaluate as ev

    record, columns, rows, best = sweep.evaluate_variants(cfg, tracking_uri, context.log.info)
    report_file = ev.report_path(cfg, record["variants"][best]["key"])
    report = read_json(report_file)
    context.log.info(f"sweep {record['name']}: best {best} ({record['variants'][best]['label']}), "
                     f"{report['val_bpb']:.4f} bits/byte")
    return dg.MaterializeResult(metadata={
        **uri(report_file), "sweep": record["name"], "best_variant": best,
        "best_values": record["variants"][best]["label"], "mlflow_parent_run_id": record["parent_run_id"],
        "mlflow_run_id": record["variants"][best]["mlflow_run_id"],
        "sweep_comparison": markdown_table(columns, rows),
        **{k: report[k] for k in ("val_bpb", "val_loss", "perplexity", "num_val_tokens", "num_val_documents")},
        **({"core": report["core"]} if report.get("core") is not None else {})})


evaluation_assets = [model_evaluation]
