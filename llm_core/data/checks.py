"""Re-count a data stage from the files on disk: what the Dagster asset checks run."""

from __future__ import annotations

from llm_core.config import ScratchConfig
from llm_core.data.files import read_json
from llm_core.data.shards import count_rows
from llm_core.data.stages import CLEAN_DIR, RAW_DIR


def verify_raw_corpus(cfg: ScratchConfig) -> tuple[bool, str]:
    """Every shard's parquet rows equal its document count, and the corpus is not empty."""
    root = cfg.data_path / RAW_DIR
    problems, total = [], 0
    for shard in read_json(root / "manifest.json").get("shards", []):
        rows = sum(count_rows(root / "shards" / part) for part in shard["parts"])
        if rows != shard["num_documents"]:
            problems.append(f"shard {shard['id']}: {rows} rows on disk, manifest says {shard['num_documents']}")
        total += rows
    if total == 0:
        problems.append("raw corpus is empty")
    return not problems, "; ".join(problems) or f"{total} documents on disk, as recorded"


def verify_cleaned_shards(cfg: ScratchConfig) -> tuple[bool, str]:
    """Per shard: rows on disk equal the kept count, and in = kept + filtered + exact + near + quarantined
    (also = kept rows + rows of the removed ledger). The whole set is not empty."""
    root = cfg.data_path / CLEAN_DIR
    problems, total_kept = [], 0
    manifest = read_json(root / "manifest.json")
    for e in manifest.get("parts", []):
        rows = count_rows(root / "shards" / e["name"])
        removed = count_rows(root / "removed" / e["name"])
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
    return not problems, "; ".join(problems) or f"{total_kept} documents; the invariant holds for every shard"
