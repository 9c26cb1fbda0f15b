"""The data stages: raw_corpus (ingest) and cleaned_shards (clean, filter, dedup).

Both are incremental inside one materialization: unchanged source files and shards are reused
(see llm_core/data/raw_corpus.py and llm_core/data/cleaned_shards.py), so "Materialize all" is
always one action and only what changed is recomputed. Their data versions change only when their
content does, so downstream assets go stale exactly when they should.
"""

import dagster as dg

from llm_core.data import checks, clean
from llm_core.data.cleaned_shards import build_cleaned_shards
from llm_core.data.raw_corpus import build_raw_corpus
from llm_core.layout import RAW_CORPUS_DIR
from pipelines.config import ScratchllmResource, run_config_class
from pipelines.failures import user_errors
from pipelines.metadata import check_result, engine_metadata, markdown_table, per_source_metadata, uri

RawCorpusConfig = run_config_class("RawCorpusConfig", "corpus", "engine")
CleanedShardsConfig = run_config_class("CleanedShardsConfig", "cleaning", "dedup", "engine")


@dg.asset(group_name="data", kinds={"parquet"}, code_version="1")
@user_errors
def raw_corpus(context: dg.AssetExecutionContext, config: RawCorpusConfig,
               scratchllm: ScratchllmResource) -> dg.MaterializeResult:
    """Every source file read into Parquet shards of documents (id, source, text); unusable files
    and records are quarantined with their reason under `data_dir/quarantine/raw_corpus`."""
    cfg = scratchllm.resolve(config)
    r = build_raw_corpus(cfg, log=context.log.info, warn=context.log.warning)
    reasons = sorted(r.quarantine_reasons.items(), key=lambda kv: -kv[1])
    return dg.MaterializeResult(
        data_version=dg.DataVersion(r.data_version),
        metadata={
            **uri(cfg.data_path / RAW_CORPUS_DIR),
            "num_documents": r.num_documents, "num_bytes": r.num_bytes, "num_quarantined": r.num_quarantined,
            "num_quarantined_records": r.num_quarantined_records, "num_quarantined_files": r.num_quarantined_files,
            "num_source_bytes": r.num_source_bytes, "num_files": r.num_files,
            "num_skipped_files": r.num_skipped_files, "num_shards_built": r.num_shards_built,
            "num_shards_reused": r.num_shards_reused, "num_parts": len(r.parts),
            "quarantine": dg.MetadataValue.path(str(r.quarantine_dir)),
            "quarantine_reasons": markdown_table(["reason", "count"], [list(kv) for kv in reasons]),
            **per_source_metadata(r.sources, {"files": "files", "documents": "documents", "bytes": "bytes",
                                              "quarantined records": "quarantined_records",
                                              "quarantined files": "quarantined_files"}),
            **engine_metadata(cfg.engine, r.tasks_per_node),
        },
    )


@dg.asset(group_name="data", kinds={"parquet"}, code_version="1", deps=[raw_corpus])
@user_errors
def cleaned_shards(context: dg.AssetExecutionContext, config: CleanedShardsConfig,
                   scratchllm: ScratchllmResource) -> dg.MaterializeResult:
    """raw_corpus normalized (unicode, control characters, whitespace), PII scrubbed, filtered by
    Gopher/C4-style quality rules, and deduplicated across the whole corpus (exact + MinHash LSH)."""
    cfg = scratchllm.resolve(config)
    r = build_cleaned_shards(cfg, log=context.log.info)
    rules = [[rule, getattr(cfg.cleaning, rule), r.filtered_by_rule.get(rule, 0)]
             for rule in clean.RULE_NAMES]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(r.data_version),
        metadata={
            **uri(r.shards_dir),
            "num_documents_in": r.num_documents_in, "num_kept": r.num_kept, "num_filtered": r.num_filtered,
            "num_exact_duplicates": r.num_exact_duplicates, "num_near_duplicates": r.num_near_duplicates,
            "num_quarantined": r.num_quarantined, "num_bytes_in": r.num_bytes_in, "num_bytes_out": r.num_bytes_out,
            "num_shards": len(r.parts), "num_parts_cleaned": r.num_parts_cleaned,
            "num_parts_reused": r.num_parts_reused, "num_shards_written": r.num_shards_written,
            "num_near_dup_candidates_checked": r.num_candidates_checked,
            "invariant_holds": r.invariant_holds(),
            "filters": markdown_table(["rule", "threshold", "documents removed"], rules),
            "pii_replacements": markdown_table(["kind", "count"], sorted(r.pii_replacements.items())),
            **per_source_metadata({name: {**c, "filtered": sum(c["filtered_by_rule"].values())}
                                   for name, c in r.sources.items()},
                                  {"in": "documents_in", "kept": "kept", "bytes in": "bytes_in",
                                   "bytes kept": "bytes_out", "filtered": "filtered", "exact dups": "exact_duplicates",
                                   "near dups": "near_duplicates", "dups of another source": "cross_source_duplicates",
                                   "quarantined": "quarantined"}),
            "preview": markdown_table(["id", "source", "text"], [[d["id"], d["source"], d["text"]]
                                                                 for d in r.preview]),
            **engine_metadata(cfg.engine, r.tasks_per_node),
        },
    )



@dg.asset_check(asset=raw_corpus, blocking=True)
def raw_corpus_counts(scratchllm: ScratchllmResource) -> dg.AssetCheckResult:
    """The documents on disk are exactly the ones recorded, and there is at least one."""
    return check_result(*checks.verify_raw_corpus(scratchllm.data_config()))


@dg.asset_check(asset=cleaned_shards, blocking=True)
def cleaned_shards_invariant(scratchllm: ScratchllmResource) -> dg.AssetCheckResult:
    """Non-empty, and per shard: in = kept + filtered + exact dups + near dups + quarantined."""
    return check_result(*checks.verify_cleaned_shards(scratchllm.data_config()))


data_assets = [raw_corpus, cleaned_shards]
data_checks = [raw_corpus_counts, cleaned_shards_invariant]
