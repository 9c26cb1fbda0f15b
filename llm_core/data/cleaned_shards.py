"""The cleaned_shards stage: raw_corpus cleaned, filtered and deduplicated, incremental by part.

Every raw part is cleaned once per cleaning config (the expensive per-piece work: normalization,
PII, quality rules, MinHash) into a cache keyed by part + config. Quality rules judge pieces; dedup
judges whole source documents (the kept pieces of each, hashed and shingled as one text), and a
duplicate document is removed with all its pieces. Dedup runs over the whole corpus from the cached
hashes and signatures (cheap; see corpus_dedup.py), and an output shard is rewritten only when its
set of kept pieces changed. Counts are of pieces (rows).

Layout under data_dir:
  cleaned_shards/manifest.json, cleaned_shards/shards/<part>.parquet   (id, doc_id, source, text)
  cleaned_shards/removed/<part>.parquet   (id, doc_id, source, reason, duplicate_of): every removed
                                          piece; duplicate_of is the doc_id of the document kept
  cleaned_shards/cache/...                per-part cleaning results
  cleaned_shards/dedup.tmp-*/             hashes spilled to disk during dedup (removed after)
  quarantine/cleaned_shards/*.jsonl       documents whose cleaning failed, each with its reason
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm_core.config import CleaningConfig, DedupConfig, ScratchConfig
from llm_core.data import clean, dedup
from llm_core.data.corpus_dedup import CorpusDedup
from llm_core.data.progress import Log, Progress
from llm_core.data.raw_corpus import EmptyCorpusError, raw_parts
from llm_core.data.shards import COMPRESSION, DOC_SCHEMA, iter_batches, write_table
from llm_core.files import TMP_MARK, Quarantine, atomic_path, read_json, remove_stale_files, short_hash, write_json
from llm_core.layout import CLEANED_SHARDS_DIR, QUARANTINE_DIR

# Per piece: its status, and for a kept piece the row of its document in the part's UNITS_SCHEMA table
# (the documents with at least one kept piece, in order: row k is row k of the signature arrays).
CACHE_SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("source", pa.string()),
                          ("text", pa.string()), ("status", pa.string()), ("unit", pa.int32())])
UNITS_SCHEMA = pa.schema([("doc_id", pa.string()), ("content_hash", pa.uint64())])
REMOVED_SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("source", pa.string()),
                            ("reason", pa.string()), ("duplicate_of", pa.string())])
KEPT = "kept"
QUARANTINED = "quarantined"


def cleaned_shard_paths(cfg: ScratchConfig) -> list[Path]:
    """The cleaned_shards output files of the last materialization, in corpus order."""
    root = cfg.data_path / CLEANED_SHARDS_DIR
    parts = read_json(root / "manifest.json").get("parts")
    if not parts:
        raise FileNotFoundError(f"cleaned_shards has not been materialized under {root}")
    return [root / "shards" / part["name"] for part in parts]


# ----------------------------------------------------------------------------------------------
# Per-part cleaning (in worker processes), cached by part + cleaning config


def _cache_files(prefix: Path) -> dict[str, Path]:
    return {"table": prefix.with_name(prefix.name + ".parquet"),
            "units": prefix.with_name(prefix.name + ".units.parquet"),
            "signatures": prefix.with_name(prefix.name + ".sig.npy"),
            "shingles": prefix.with_name(prefix.name + ".shingles.npy"),
            "offsets": prefix.with_name(prefix.name + ".offsets.npy")}


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


class _PartUnits:
    """The documents of a part that have at least one kept piece (its dedup units), in order, each
    with the sketch of its kept pieces taken as one text. A document's pieces are consecutive rows."""

    def __init__(self, dcfg: DedupConfig):
        self.hasher, self.shingle_words = dedup.MinHasher(dcfg.num_permutations, dcfg.seed), dcfg.shingle_words
        self.doc_ids: list[str] = []
        self.content_hashes: list[int] = []
        self.signatures: list[np.ndarray] = []
        self.shingles: list[np.ndarray] = []
        self._doc_id: str | None = None
        self._sketch: dedup.DocumentSketch | None = None

    def add_kept_piece(self, doc_id: str, words: list[bytes], hashes: np.ndarray) -> int:
        """Returns the unit number of the piece's document."""
        if doc_id != self._doc_id:
            self.close()
            self._doc_id, self._sketch = doc_id, dedup.DocumentSketch(self.hasher, self.shingle_words)
        self._sketch.add(words, hashes)
        return len(self.doc_ids)

    def close(self) -> None:
        """Finish the current document."""
        if self._sketch is not None:
            content_hash, signature, shingles = self._sketch.finish()
            self.doc_ids.append(self._doc_id)
            self.content_hashes.append(content_hash)
            self.signatures.append(signature)
            self.shingles.append(shingles)
            self._sketch = None

    def save(self, files: dict[str, Path], num_permutations: int) -> None:
        self.close()
        _save_npy(files["signatures"], np.stack(self.signatures) if self.signatures else
                  np.empty((0, num_permutations), dtype=np.uint64))
        _save_npy(files["shingles"], np.concatenate(self.shingles) if self.shingles else np.empty(0, dtype=np.uint32))
        _save_npy(files["offsets"], np.cumsum([0] + [len(s) for s in self.shingles], dtype=np.int64))
        write_table(files["units"], pa.table({"doc_id": self.doc_ids, "content_hash": self.content_hashes},
                                             schema=UNITS_SCHEMA))


def clean_part(raw_path: str, cache_prefix: str, cleaning: dict, dedup_cfg: dict) -> dict:
    """Clean one raw part into the cache: text + status per piece, and per document with a kept piece
    the content hash, MinHash signature and shingle set that the corpus-wide dedup needs. Runs in a
    worker process. The cache table is written batch by batch (memory stays bounded by a batch and
    the dedup sketch of one document, not the part)."""
    ccfg, dcfg = CleaningConfig(**cleaning), DedupConfig(**dedup_cfg)
    files = _cache_files(Path(cache_prefix))
    units = _PartUnits(dcfg)
    statuses: Counter = Counter()
    pii: dict[str, int] = {}
    quarantined: list[tuple[str, str, str]] = []
    bytes_in = 0
    tmp_table = files["table"].with_name(f"{files['table'].name}{TMP_MARK}{os.getpid()}")
    writer = pq.ParquetWriter(tmp_table, CACHE_SCHEMA, compression=COMPRESSION)
    try:
        for batch in iter_batches(Path(raw_path), ["id", "doc_id", "source", "text"]):
            columns: dict[str, list] = {name: [] for name in CACHE_SCHEMA.names}
            for piece_id, doc_id, source, text in zip(*(batch.column(i).to_pylist() for i in range(4))):
                bytes_in += len(text)
                unit = -1
                try:
                    text = clean.normalize(text, ccfg.unicode_form)
                    if ccfg.scrub_pii:
                        text = clean.scrub_pii(text, pii)
                    words = dedup.split_words(text)
                    hashes = dedup.word_hashes(words)
                    status = clean.quality_rule_failed(text, hashes, ccfg, later_piece=piece_id != doc_id) or KEPT
                    if status == KEPT:
                        unit = units.add_kept_piece(doc_id, words, hashes)
                except Exception as exc:  # one odd document must not stop the corpus; it is quarantined
                    status, unit = QUARANTINED, -1
                    quarantined.append((piece_id, source, f"cleaning failed: {type(exc).__name__}: {exc}"))
                statuses[status] += 1
                for name, value in zip(CACHE_SCHEMA.names, (piece_id, doc_id, source, text, status, unit)):
                    columns[name].append(value)
            writer.write_table(pa.table(columns, schema=CACHE_SCHEMA))
        writer.close()
        units.save(files, dcfg.num_permutations)
        os.replace(tmp_table, files["table"])  # last: marks the cache complete
    finally:
        writer.close()  # no-op when closed; after an error it releases the file, which is removed
        tmp_table.unlink(missing_ok=True)
    return {"statuses": dict(statuses), "pii": pii, "quarantined": quarantined, "bytes_in": bytes_in}


# ----------------------------------------------------------------------------------------------
# The stage: clean what is not cached, dedup the whole corpus, write the parts whose kept pieces changed


@dataclasses.dataclass
class CleanedShardsResult:
    num_documents_in: int
    num_kept: int
    num_filtered: int
    num_exact_duplicates: int
    num_near_duplicates: int
    num_quarantined: int
    filtered_by_rule: dict[str, int]
    pii_replacements: dict[str, int]
    num_bytes_in: int
    num_bytes_out: int
    num_parts_cleaned: int
    num_parts_reused: int
    num_shards_written: int
    num_candidates_checked: int
    parts: list[dict]  # per output shard: name, counts
    shards_dir: Path
    data_version: str
    preview: list[dict]

    def invariant_holds(self) -> bool:
        return self.num_documents_in == (self.num_kept + self.num_filtered + self.num_exact_duplicates
                                         + self.num_near_duplicates + self.num_quarantined)


def _clean_missing_parts(jobs: list[tuple[str, str]], cfg: ScratchConfig, log: Log) -> dict[str, dict]:
    """Run clean_part for (raw part, cache prefix) jobs, in parallel when asked; returns summaries."""
    args = (cfg.cleaning.model_dump(), cfg.dedup.model_dump())
    progress = Progress(log, "cleaning parts", len(jobs))
    summaries: dict[str, dict] = {}
    done_bytes = 0
    workers = min(cfg.cleaning.num_workers, len(jobs))
    if workers <= 1:
        for raw, prefix in jobs:
            summaries[prefix] = clean_part(raw, prefix, *args)
            done_bytes += summaries[prefix]["bytes_in"]
            progress.update(len(summaries), done_bytes, force=True)
        return summaries
    # spawn, not fork: the caller (a Dagster step) may hold threads and locks.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(clean_part, raw, prefix, *args): prefix for raw, prefix in jobs}
        for future in concurrent.futures.as_completed(futures):
            summaries[futures[future]] = future.result()
            done_bytes += summaries[futures[future]]["bytes_in"]
            progress.update(len(summaries), done_bytes, force=True)
    return summaries


def build_cleaned_shards(cfg: ScratchConfig, log: Log = print) -> CleanedShardsResult:
    root = cfg.data_path / CLEANED_SHARDS_DIR
    cache_dir, shards_dir, removed_dir = root / "cache", root / "shards", root / "removed"
    manifest_path = root / "manifest.json"
    cache_dir.mkdir(parents=True, exist_ok=True)
    clean_key = short_hash({"cleaning": cfg.cleaning.model_dump(exclude={"num_workers"}),
                       "minhash": cfg.dedup.model_dump(include={"shingle_words", "num_permutations", "seed"})})
    parts = raw_parts(cfg)
    prefixes = [cache_dir / f"{p.stem}-{clean_key}" for p in parts]

    # 1. Clean the parts that have no cache entry for this config (the expensive, parallel work).
    jobs = [(str(p), str(prefix)) for p, prefix in zip(parts, prefixes)
            if not all(f.exists() for f in _cache_files(prefix).values())]
    log(f"cleaned_shards: {len(parts)} raw parts, {len(jobs)} to clean, {len(parts) - len(jobs)} cached")
    summaries = _clean_missing_parts(jobs, cfg, log)
    previous = {entry["cache"]: entry for entry in read_json(manifest_path).get("parts", [])}

    # 2. Corpus-wide dedup in corpus order, from hashes and signatures only.
    duplicates = CorpusDedup(cfg.dedup, [_cache_files(p) for p in prefixes], root)
    entries, preview = [], []
    written = 0
    totals: Counter = Counter()
    filtered_by_rule: Counter = Counter()
    pii: Counter = Counter()
    progress = Progress(log, "dedup + write", len(parts))
    for part_index, (raw, prefix, (num_rows, removed)) in enumerate(zip(parts, prefixes, duplicates.removals())):
        files = _cache_files(prefix)
        counts = Counter(reason for reason, _ in removed.values())
        entry = {"cache": prefix.name, "raw_part": raw.name, "name": f"{raw.stem}.parquet",
                 "num_documents_in": num_rows, "num_kept": num_rows - len(removed),
                 "num_exact_duplicates": counts.pop("exact_duplicate", 0),
                 "num_near_duplicates": counts.pop("near_duplicate", 0),
                 "num_quarantined": counts.pop(QUARANTINED, 0), "filtered_by_rule": dict(counts),
                 "removed_key": short_hash(sorted((r, reason, dup) for r, (reason, dup) in removed.items())),
                 "pii": summaries.get(str(prefix), {}).get("pii")}
        old = previous.get(prefix.name)
        if entry["pii"] is None:  # cleaned in an earlier run: its PII counts were recorded then
            entry["pii"] = old.get("pii", {}) if old else {}
        up_to_date = old and old["removed_key"] == entry["removed_key"] and \
            (shards_dir / entry["name"]).exists() and (removed_dir / entry["name"]).exists()
        if up_to_date:
            entry["num_bytes_out"] = old["num_bytes_out"]
            entry["num_bytes_in"] = old["num_bytes_in"]
        else:
            entry["num_bytes_in"], entry["num_bytes_out"] = _write_outputs(
                files["table"], removed, shards_dir / entry["name"], removed_dir / entry["name"])
            written += 1
        _quarantine_cleaning_failures(cfg, prefix.name, summaries.get(str(prefix)))
        if len(preview) < 5:
            preview += _preview(shards_dir / entry["name"], 5 - len(preview))
        entries.append(entry)
        for key in ("num_documents_in", "num_kept", "num_exact_duplicates", "num_near_duplicates",
                    "num_quarantined", "num_bytes_in", "num_bytes_out"):
            totals[key] += entry[key]
        filtered_by_rule.update(entry["filtered_by_rule"])
        pii.update(entry["pii"])
        progress.update(part_index + 1, totals["num_bytes_in"], force=part_index + 1 == len(parts))

    write_json(manifest_path, {"parts": entries, "clean_key": clean_key})
    names = {e["name"] for e in entries}
    remove_stale_files(shards_dir, names)
    remove_stale_files(removed_dir, names)
    keep_cache = {f.name for p in prefixes for f in _cache_files(p).values()}
    remove_stale_files(cache_dir, keep_cache)

    result = CleanedShardsResult(
        num_documents_in=totals["num_documents_in"], num_kept=totals["num_kept"],
        num_filtered=sum(filtered_by_rule.values()), num_exact_duplicates=totals["num_exact_duplicates"],
        num_near_duplicates=totals["num_near_duplicates"], num_quarantined=totals["num_quarantined"],
        filtered_by_rule=dict(filtered_by_rule), pii_replacements=dict(pii),
        num_bytes_in=totals["num_bytes_in"], num_bytes_out=totals["num_bytes_out"],
        num_parts_cleaned=len(jobs), num_parts_reused=len(parts) - len(jobs), num_shards_written=written,
        num_candidates_checked=duplicates.index.num_candidates_checked if duplicates.index else 0,
        parts=entries, shards_dir=shards_dir, data_version=short_hash([e["removed_key"] + e["cache"] for e in entries]),
        preview=preview,
    )
    log(f"cleaned_shards: {result.num_documents_in} in, {result.num_kept} kept, {result.num_filtered} filtered, "
        f"{result.num_exact_duplicates} exact dups, {result.num_near_duplicates} near dups, "
        f"{result.num_quarantined} quarantined; {written} shards written")
    if result.num_kept == 0:
        raise EmptyCorpusError(f"cleaning kept no document of {result.num_documents_in}: "
                               f"filtered by rule {result.filtered_by_rule}; check the `cleaning` settings")
    return result


def _write_outputs(cache_table: Path, removed: dict[int, tuple[str, str | None]],
                   shard_path: Path, removed_path: Path) -> tuple[int, int]:
    """Write the kept pieces of one part and the ledger of its removed pieces; returns the text bytes in
    and out. Batch by batch with Arrow filtering (no per-row Python; memory bounded by a batch, not the part)."""
    removed_rows = np.array(sorted(removed), dtype=np.int64)
    ledger: dict[str, list] = {"id": [], "doc_id": [], "source": []}
    bytes_in = bytes_out = start = 0
    text_bytes = lambda batch: int(pc.sum(pc.binary_length(batch.column("text"))).as_py() or 0)  # noqa: E731
    with atomic_path(shard_path) as tmp, pq.ParquetWriter(tmp, DOC_SCHEMA, compression=COMPRESSION) as writer:
        for batch in iter_batches(cache_table, DOC_SCHEMA.names):
            rows = removed_rows[(removed_rows >= start) & (removed_rows < start + batch.num_rows)] - start
            keep = np.ones(batch.num_rows, dtype=bool)
            keep[rows] = False
            kept = batch.filter(pa.array(keep))
            writer.write_table(pa.Table.from_batches([kept]).cast(DOC_SCHEMA))
            for name in ledger:
                ledger[name] += batch.column(name).take(pa.array(rows)).to_pylist()
            bytes_in, bytes_out = bytes_in + text_bytes(batch), bytes_out + text_bytes(kept)
            start += batch.num_rows
    reasons, duplicate_of = zip(*(removed[r] for r in removed_rows.tolist())) if len(removed) else ((), ())
    write_table(removed_path, pa.table({**ledger, "reason": reasons, "duplicate_of": duplicate_of},
                                       schema=REMOVED_SCHEMA))
    return bytes_in, bytes_out


def _quarantine_cleaning_failures(cfg: ScratchConfig, name: str, summary: dict | None) -> None:
    if not summary or not summary["quarantined"]:
        return
    quarantine = Quarantine(cfg.data_path / QUARANTINE_DIR / CLEANED_SHARDS_DIR, name)
    for doc_id, source, reason in summary["quarantined"]:
        quarantine.add_record(source, reason, doc_id, "document id")
    quarantine.commit()


def _preview(shard: Path, n: int) -> list[dict]:
    table = pq.ParquetFile(shard).read_row_group(0) if pq.ParquetFile(shard).num_row_groups else None
    if table is None:
        return []
    return [{"id": r["id"], "source": r["source"], "text": r["text"]} for r in table.slice(0, n).to_pylist()]
