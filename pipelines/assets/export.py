"""hf_export: the latest trained model as a Hugging Face transformers directory (LlamaForCausalLM), with
its model card."""

from pathlib import Path

import dagster as dg

from llm_core.registry import model_card
from llm_core.model_files import latest_model
from llm_core.layout import EXPORT_DIR, MODEL_TOKENIZER_SUBDIR
from pipelines.assets.evaluation import model_evaluation
from pipelines.assets.training import trained_model
from pipelines.config import ScratchllmResource
from pipelines.failures import user_errors
from pipelines.metadata import uri


@dg.asset(group_name="export", kinds={"huggingface", "safetensors"}, code_version="1",
          deps=[trained_model, model_evaluation])
@user_errors
def hf_export(context: dg.AssetExecutionContext, scratchllm: ScratchllmResource) -> dg.MaterializeResult:
    """config.json, model.safetensors, generation_config.json, the tokenizer files and the model card
    (README.md) of the latest trained model: `transformers.AutoModelForCausalLM.from_pretrained(dir)`
    and `AutoTokenizer` load it."""
    from llm_core.registry.export import export_hf, num_parameters

    cfg = scratchllm.data_config()
    latest = latest_model(cfg)
    if "val_bpb" not in model_card.evaluation_report(cfg, latest["path"]):  # the report its card shows
        raise FileNotFoundError(f"no evaluation of training {latest['key']}: materialize `model_evaluation` first")
    # overwrite: the same training key is the same model, exported again; cfg: export_hf writes the card
    out_dir = export_hf(latest["path"], Path(latest["path"]) / MODEL_TOKENIZER_SUBDIR,
                        cfg.data_path / EXPORT_DIR / latest["key"], overwrite=True, cfg=cfg)
    context.log.info(f"exported {latest['path']} to {out_dir}")
    return dg.MaterializeResult(
        metadata={**uri(out_dir), "num_parameters": num_parameters(out_dir), "training_key": latest["key"],
                  "files": sorted(p.name for p in out_dir.iterdir())},
        data_version=dg.DataVersion(latest["key"]),
    )


export_assets = [hf_export]
