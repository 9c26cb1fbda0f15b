"""Re-count a data stage from the files on disk: what the Dagster asset checks run."""

from __future__ import annotations

from llm_core.config import ScratchConfig
from llm_core.data.shards import count_rows, iter_batches
from llm_core.files import read_json
from llm_core.layout import CLEANED_SHARDS_DIR, RAW_CORPUS_DIR


def verify_raw_corpus(cfg: ScratchConfig) -> tuple[bool, str]:
    """Every shard's parquet rows equal its document count, and the corpus is not empty."""
    root = cfg.data_path / RAW_CORPUS_DIR
    problems, total = [], 0
    for shard in read_json(root / "manifest.json").get("shards", []):
        rows = sum(count_rows(root / "shards" / part) for part in shard["parts"])
        if rows != shard["num_documents"]:
            problems.append(f"shard {shard['id']}: {rows} rows on disk, manifest says {shard['num_documents']}")
        total += rows
    if total == 0:
        problems.append("raw corpus is empty")
    return not problems, "; ".join(problems) or f"{total} pieces on disk, as recorded"


def _doc_ids(path, reasons: tuple[str, ...] | None = None) -> set[str]:
    """The doc_ids of a shard's rows (of a ledger's rows removed for one of `reasons`)."""
    out: set[str] = set()
    for batch in iter_batches(path, ["doc_id"] + ["reason"] * (reasons is not None)):
        ids = batch.column(0).to_pylist()
        if reasons is not None:
            ids = [i for i, reason in zip(ids, batch.column(1).to_pylist()) if reason in reasons]
        out.update(ids)
    return out


def verify_cleaned_shards(cfg: ScratchConfig) -> tuple[bool, str]:
    """Per shard, counting pieces (rows): rows on disk equal the kept count, and in = kept + filtered +
    exact + near + quarantined (also = kept rows + rows of the removed ledger); no document removed as a
    duplicate keeps a piece. The whole set is not empty."""
    root = cfg.data_path / CLEANED_SHARDS_DIR
    problems, total_kept = [], 0
    manifest = read_json(root / "manifest.json")
    for e in manifest.get("parts", []):
        rows = count_rows(root / "shards" / e["name"])
        removed = count_rows(root / "removed" / e["name"])
        if e["num_exact_duplicates"] or e["num_near_duplicates"]:  # a document's pieces are all in one shard
            duplicates = _doc_ids(root / "removed" / e["name"], ("exact_duplicate", "near_duplicate"))
            if partly := duplicates & _doc_ids(root / "shards" / e["name"]):
                problems.append(f"{e['name']}: {len(partly)} documents removed as duplicates still have kept "
                                f"pieces (e.g. {sorted(partly)[0]})")
        accounted = e["num_kept"] + sum(e["filtered_by_rule"].values()) + e["num_exact_duplicates"] + \
            e["num_near_duplicates"] + e["num_quarantined"]
        if rows != e["num_kept"]:
            problems.append(f"{e['name']}: {rows} rows on disk, manifest says {e['num_kept']} kept")
        if accounted != e["num_documents_in"] or rows + removed != e["num_documents_in"]:
            problems.append(f"{e['name']}: {e['num_documents_in']} in, but {accounted} accounted for "
                            f"and {rows} + {removed} rows on disk")
        total_kept += rows
    if total_kept == 0:
        problems.append("cleaned shards are empty")
    return not problems, "; ".join(problems) or f"{total_kept} pieces kept; the invariant holds for every shard"
