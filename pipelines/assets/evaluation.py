"""model_evaluation: validation loss, perplexity, bits per byte and samples of the trained model,
logged to the training's MLflow run."""

from pathlib import Path

import dagster as dg

from llm_core import evaluate as ev, tracking
from llm_core.layout import EVALUATION_DIR, MODEL_TOKENIZER_SUBDIR
from llm_core.files import write_json
from llm_core.checkpoint import latest_model, load_model
from pipelines.assets.training import trained_model
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.metadata import markdown_table, uri
from pipelines.resources import MLflowResource

ModelEvaluationConfig = run_config_class("ModelEvaluationConfig", "evaluation")


@dg.asset(group_name="evaluation", kinds={"pytorch", "mlflow"}, code_version="1", deps=[trained_model])
def model_evaluation(context: dg.AssetExecutionContext, config: ModelEvaluationConfig,
                     scratchllm: ScratchllmResource, mlflow: MLflowResource) -> dg.MaterializeResult:
    """Loss, perplexity and bits per byte on the whole validation split, and seeded sample
    generations for `evaluation.prompts`."""
    cfg = scratchllm.resolve(config)
    latest = latest_model(cfg)
    r = ev.evaluate(cfg, load_model(latest["path"]), Path(latest["path"]) / MODEL_TOKENIZER_SUBDIR)
    out_dir = cfg.data_path / EVALUATION_DIR / latest["key"]
    report = {"val_loss": r.val_loss, "perplexity": r.perplexity, "val_bpb": r.val_bpb,
              "num_val_tokens": r.num_val_tokens, "samples": r.samples, "evaluation": cfg.evaluation.model_dump()}
    write_json(out_dir / "report.json", report)

    run_id = latest["mlflow_run_id"]
    tracking.log_evaluation(latest.get("tracking_uri") or mlflow.uri(cfg), run_id,
                            {k: report[k] for k in ("val_loss", "perplexity", "val_bpb")}, r.samples)
    context.log.info(f"val loss {r.val_loss:.4f}, perplexity {r.perplexity:.1f}, {r.val_bpb:.3f} bits/byte")
    return dg.MaterializeResult(
        metadata={**uri(out_dir / "report.json"), "val_loss": r.val_loss, "val_bpb": r.val_bpb,
                  "perplexity": r.perplexity, "num_val_tokens": r.num_val_tokens, "mlflow_run_id": run_id,
                  "samples": markdown_table(["prompt", "completion"],
                                            [[s["prompt"], s["completion"]] for s in r.samples], max_cell=400)},
    )


evaluation_assets = [model_evaluation]
