"""The tokenizer stages: a byte-level BPE tokenizer, and the corpus encoded into token files."""

import dagster as dg

from llm_core.training import model_source
from llm_core.data.tokenizer import load_tokenizer, train_tokenizer, verify_roundtrip
from llm_core.data.cleaned_shards import cleaned_shard_paths
from llm_core.layout import TOKENIZER_DIR
from llm_core.data.tokenized_dataset import (
    build_tokenized_dataset,
    tokenizer_hash,
    verify_decontamination,
    verify_token_accounting,
    verify_token_ids,
)
from pipelines.assets.corpus import cleaned_shards
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.failures import user_errors
from pipelines.metadata import check_result, engine_metadata, markdown_table, per_source_metadata, uri
from pipelines.resources import MLflowResource, with_warm_start

TokenizerConfig = run_config_class("TokenizerConfig", "tokenizer")
TokenizedDatasetConfig = run_config_class("TokenizedDatasetConfig", "dataset", "engine")


@dg.asset(group_name="tokenizer", kinds={"huggingface"}, code_version="1", deps=[cleaned_shards])
@user_errors
def tokenizer(context: dg.AssetExecutionContext, config: TokenizerConfig, scratchllm: ScratchllmResource,
              mlflow: MLflowResource) -> dg.MaterializeResult:
    """Byte-level BPE (HF `tokenizers`) trained on the training split of the cleaned shards;
    loadable with `transformers.AutoTokenizer`. Validation documents are held out. When the
    training warm-starts (training.init_from, or a retrain that continues from the champion), the
    source model's tokenizer is kept instead: its weights mean those tokens."""
    cfg = scratchllm.resolve(config)
    warm = model_source.resolve_init_from(with_warm_start(context, cfg, mlflow.uri(cfg)))
    out_dir = cfg.data_path / TOKENIZER_DIR
    r = train_tokenizer(cfg, cleaned_shard_paths(cfg), out_dir, log=context.log.info,
                        keep=model_source.tokenizer_dir_of(warm.model_dir, cfg) if warm else None,
                        warn=context.log.warning)
    examples = [[text, " ".join(tokens)] for text, tokens in r.examples]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(tokenizer_hash(out_dir)),
        metadata={
            **uri(r.path), "vocab_size": r.vocab_size, "vocab_size_requested": r.vocab_size_requested,
            "bytes_per_token": round(r.bytes_per_token, 4),
            "train_seconds": round(r.train_seconds, 2), "num_training_bytes": r.num_training_bytes,
            "num_training_documents": r.num_training_documents,
            "num_roundtrip_failures": len(r.roundtrip_failures),
            "kept_from": warm.registered_version or warm.spec if warm else "trained here",
            "examples": markdown_table(["text", "tokens (Ġ = space, Ċ = newline)"], examples),
        },
    )


@dg.asset_check(asset=tokenizer, blocking=True)
def tokenizer_roundtrip(scratchllm: ScratchllmResource) -> dg.AssetCheckResult:
    """decode(encode(x)) == x, byte for byte, on held-out documents and on tricky unicode/whitespace."""
    cfg = scratchllm.data_config()
    return check_result(*verify_roundtrip(cfg, cleaned_shard_paths(cfg)))


@dg.asset(group_name="tokenizer", kinds={"arrow"}, code_version="1", deps=[tokenizer, cleaned_shards])
@user_errors
def tokenized_dataset(context: dg.AssetExecutionContext, config: TokenizedDatasetConfig,
                      scratchllm: ScratchllmResource) -> dg.MaterializeResult:
    """The cleaned shards encoded into memory-mappable Arrow IPC token files (uint16 when the
    vocabulary fits), split train/val by document, each document ended by <|endoftext|>."""
    cfg = scratchllm.resolve(config)
    tok_dir = cfg.data_path / TOKENIZER_DIR
    r = build_tokenized_dataset(cfg, load_tokenizer(tok_dir), tok_dir, log=context.log.info, warn=context.log.warning)
    s = r.split
    return dg.MaterializeResult(
        data_version=dg.DataVersion(r.data_version),
        metadata={
            **uri(r.out_dir), "num_train_tokens": r.num_train_tokens, "num_val_tokens": r.num_val_tokens,
            "val_bytes": r.val_bytes, "num_train_documents": r.num_train_documents,
            "num_val_documents": r.num_val_documents, "dtype": r.dtype,
            "num_shards_encoded": r.num_shards_encoded, "num_shards_reused": r.num_shards_reused,
            "builtin_task_items": r.builtin_task_items,
            "split_unit": s["unit"], "split_as_asked": s["as_asked"], "split_reason": s["reason"],
            "val_fraction_requested": s["val_fraction"],
            **{f"val_share_{k}": round(s[f"val_share_{k}"], 4) for k in ("documents", "bytes", "tokens")},
            "split": markdown_table(["", "source documents", "pieces", "bytes", "tokens"], [
                [side, s[f"{side}_documents"], s[f"{side}_pieces"], s[f"{side}_bytes"], s[f"{side}_tokens"]]
                for side in ("train", "val")]),
            **per_source_metadata(r.sources, {"train tokens": "train_tokens", "val tokens": "val_tokens",
                                              "train documents": "train_documents", "val documents": "val_documents",
                                              "val bytes": "val_bytes", "contaminated": "contaminated_documents"}),
            "num_contaminated_documents": r.contamination["num_contaminated_documents"],
            "num_contaminated_removed": r.contamination["num_removed"],
            "decontamination": f"{r.contamination['mode']}, {r.contamination['ngram']}-grams of "
                               f"{r.contamination['items_checked']} evaluation items",
            **({"contaminated_documents": markdown_table(
                ["training document", "source document", "matches item", "removed"],
                [[c["id"], c["doc_id"], c["item"], c["removed"]] for c in r.contamination["documents"][:50]])}
               if r.contamination["documents"] else {}),
            "encode_mb_per_second": round(r.num_bytes / 1e6 / r.encode_seconds, 2) if r.encode_seconds else None,
            **engine_metadata(cfg.engine, r.tasks_per_node),
        },
    )


@dg.asset_check(asset=tokenized_dataset, blocking=True)
def token_ids_fit(scratchllm: ScratchllmResource) -> dg.AssetCheckResult:
    """Every token id is below the vocabulary size and fits the stored dtype."""
    return check_result(*verify_token_ids(scratchllm.data_config()))


@dg.asset_check(asset=tokenized_dataset, blocking=True)
def token_accounting(scratchllm: ScratchllmResource) -> dg.AssetCheckResult:
    """Stored token counts add up, and re-encoding sampled documents gives the stored ids."""
    cfg = scratchllm.data_config()
    return check_result(*verify_token_accounting(cfg, load_tokenizer(cfg.data_path / TOKENIZER_DIR)))


@dg.asset_check(asset=tokenized_dataset, blocking=True)
def no_eval_contamination(scratchllm: ScratchllmResource) -> dg.AssetCheckResult:
    """No training document shares a word n-gram (dataset.decontamination_ngram) with an evaluation
    task item; with dataset.decontamination: fail, any that does fails this check (and training waits)."""
    return check_result(*verify_decontamination(scratchllm.data_config()))


tokenizer_assets = [tokenizer, tokenized_dataset]
tokenizer_checks = [tokenizer_roundtrip, token_ids_fit, token_accounting, no_eval_contamination]
