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

import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm_core.config import CleaningConfig, DedupConfig, ScratchConfig
from llm_core.data import clean, dedup
from llm_core.data.corpus_dedup import CorpusDedup
from llm_core.data.progress import Log
from llm_core.data.raw_corpus import EmptyCorpusError, raw_parts
from llm_core.data.raw_corpus import source_names as raw_source_names
from llm_core.data.shards import COMPRESSION, DOC_SCHEMA, iter_batches, write_table
from llm_core.data.sharded_dedup import ShardedDedup
from llm_core.data.engine import Engine, data_engine
from llm_core.faults import hold_point
from llm_core.files import (
    TMP_MARK,
    Quarantine,
    atomic_path,
    read_json,
    remove_stale_files,
    save_npy,
    short_hash,
    write_json,
)
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
        save_npy(files["signatures"], np.stack(self.signatures) if self.signatures else
                  np.empty((0, num_permutations), dtype=np.uint64))
        save_npy(files["shingles"], np.concatenate(self.shingles) if self.shingles else np.empty(0, dtype=np.uint32))
        save_npy(files["offsets"], np.cumsum([0] + [len(s) for s in self.shingles], dtype=np.int64))
        write_table(files["units"], pa.table({"doc_id": self.doc_ids, "content_hash": self.content_hashes},
                                             schema=UNITS_SCHEMA))


def clean_part(raw_path: str, cache_prefix: str, cleaning: dict, dedup_cfg: dict) -> dict:
    """Clean one raw part into the cache: text + status per piece, and per document with a kept piece
    the content hash, MinHash signature and shingle set that the corpus-wide dedup needs. Runs in a
    worker process. The cache table is written batch by batch (memory stays bounded by a batch and
    the dedup sketch of one document, not the part)."""
    hold_point(f"clean_part:{Path(raw_path).name}")  # tests kill the worker here (llm_core/faults.py)
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
    tasks_per_node: dict[str, int]  # where the per-part work ran (engine.kind: ray spreads it)
    sources: dict[str, dict]  # source name -> counts as _source_counts, with bytes_in/bytes_out
    parts: list[dict]  # per output shard: name, counts
    shards_dir: Path
    data_version: str
    preview: list[dict]

    def invariant_holds(self) -> bool:
        return self.num_documents_in == (self.num_kept + self.num_filtered + self.num_exact_duplicates
                                         + self.num_near_duplicates + self.num_quarantined)


@dataclasses.dataclass(frozen=True)
class SourceNames:
    """How to name the source of a piece (its file URI) and of the document a duplicate was kept as
    (its doc_id's file key): raw_corpus's record, see raw_corpus.source_names."""

    by_uri: dict[str, str]
    by_file_key: dict[str, str]

    def key(self, uris: pa.ChunkedArray) -> str:
        """What a part's per-source counts depend on besides its rows: the names of its files' sources."""
        return short_hash(sorted((u, self.by_uri.get(u)) for u in pc.unique(uris).to_pylist()))


def _finish_part(cache: dict[str, Path], removed_units: dict[int, tuple[str, str]], shard_path: Path,
                 removed_path: Path, old: dict | None, names: SourceNames) -> dict:
    """A part's output shard and removed-pieces ledger, given its duplicate documents (units), and its
    manifest counts (in total and per source). Written only when the removed pieces and the source names
    are those of `old` (its previous entry)."""
    table = pq.read_table(cache["table"], columns=["status", "unit", "source"])
    removed = _removed_rows(table, removed_units)
    counts = Counter(reason for reason, _ in removed.values())
    entry = {"num_documents_in": table.num_rows, "num_kept": table.num_rows - len(removed),
             "num_exact_duplicates": counts.pop("exact_duplicate", 0),
             "num_near_duplicates": counts.pop("near_duplicate", 0),
             "num_quarantined": counts.pop(QUARANTINED, 0), "filtered_by_rule": dict(counts),
             "removed_key": short_hash(sorted((r, reason, dup) for r, (reason, dup) in removed.items())),
             "sources_key": names.key(table.column("source")),
             "sources": _source_counts(table.column("source"), removed, names)}
    if old and (old["removed_key"], old.get("sources_key")) == (entry["removed_key"], entry["sources_key"]) and \
            shard_path.exists() and removed_path.exists():
        for name, c in entry["sources"].items():
            c.update(bytes_in=old["sources"][name]["bytes_in"], bytes_out=old["sources"][name]["bytes_out"])
        return {**entry, "num_bytes_in": old["num_bytes_in"], "num_bytes_out": old["num_bytes_out"], "written": False}
    bytes_in, bytes_out = _write_outputs(cache["table"], removed, shard_path, removed_path, names, entry["sources"])
    return {**entry, "num_bytes_in": bytes_in, "num_bytes_out": bytes_out, "written": True}


def _source_counts(uris: pa.ChunkedArray, removed: dict[int, tuple[str, str | None]],
                   names: SourceNames) -> dict[str, dict]:
    """Per source of a part: pieces in and kept, removed by reason, and the duplicates whose kept copy
    is in another source (a duplicate counts against the source that lost it)."""
    encoded = uris.combine_chunks().dictionary_encode()
    row_source = np.array([names.by_uri.get(u, u) for u in encoded.dictionary.to_pylist()], dtype=object)
    row_source = row_source[encoded.indices.to_numpy()] if len(encoded) else np.empty(0, dtype=object)
    out: dict[str, dict] = {}
    for name, n in Counter(row_source.tolist()).items():
        out[name] = {"documents_in": n, "kept": n, "exact_duplicates": 0, "near_duplicates": 0,
                     "cross_source_duplicates": 0, "quarantined": 0, "filtered_by_rule": {}}
    for row, (reason, duplicate_of) in removed.items():
        c = out[row_source[row]]
        c["kept"] -= 1
        if reason in ("exact_duplicate", "near_duplicate"):
            c[reason + "s"] += 1
            c["cross_source_duplicates"] += names.by_file_key.get(duplicate_of.split("-")[0]) != row_source[row]
        elif reason == QUARANTINED:
            c["quarantined"] += 1
        else:
            c["filtered_by_rule"][reason] = c["filtered_by_rule"].get(reason, 0) + 1
    return out


def _removed_rows(table: pa.Table, removed_units: dict[int, tuple[str, str]]) -> dict[int, tuple[str, str | None]]:
    """Row -> (reason, duplicate_of) of a part's removed pieces: those the cleaning did not keep, and
    every kept piece of a duplicate document."""
    unit = table.column("unit").to_numpy()
    not_kept = np.flatnonzero(unit < 0)
    removed = dict(zip(not_kept.tolist(), ((s, None) for s in table.column("status").take(not_kept).to_pylist())))
    if removed_units:
        duplicate = np.flatnonzero(np.isin(unit, list(removed_units)))
        removed.update((row, removed_units[u]) for row, u in zip(duplicate.tolist(), unit[duplicate].tolist()))
    return dict(sorted(removed.items()))


def _duplicates(cfg: ScratchConfig, engine: Engine, caches: list[dict[str, Path]], root: Path,
                log: Log) -> tuple[Iterable[dict[int, tuple[str, str]]], Callable[[], int]]:
    """(per part in corpus order: its duplicate units -> (reason, doc_id kept), candidates checked).
    On this machine one streaming pass in corpus order (corpus_dedup.py); on a cluster a partitioned
    shuffle over tasks (sharded_dedup.py). The decisions are the same."""
    if engine.kind == "local":
        duplicates = CorpusDedup(cfg.dedup, caches, root)
        return duplicates.removed_units(), lambda: duplicates.num_candidates_checked
    sharded = ShardedDedup(cfg.dedup, caches, root, engine, log)
    return sharded.removed_units, lambda: sharded.num_candidates_checked


def build_cleaned_shards(cfg: ScratchConfig, log: Log = print) -> CleanedShardsResult:
    root = cfg.data_path / CLEANED_SHARDS_DIR
    cache_dir, shards_dir, removed_dir = root / "cache", root / "shards", root / "removed"
    manifest_path = root / "manifest.json"
    cache_dir.mkdir(parents=True, exist_ok=True)
    clean_key = short_hash({"cleaning": cfg.cleaning.model_dump(exclude={"num_workers"}),
                       "minhash": cfg.dedup.model_dump(include={"shingle_words", "num_permutations", "seed"})})
    parts = raw_parts(cfg)
    prefixes = [cache_dir / f"{p.stem}-{clean_key}" for p in parts]
    caches = [_cache_files(prefix) for prefix in prefixes]
    names = [f"{raw.stem}.parquet" for raw in parts]
    previous = {entry["cache"]: entry for entry in read_json(manifest_path).get("parts", [])}

    with data_engine(cfg.engine, log, cfg.data_path) as engine:
        # 1. Clean the parts that have no cache entry for this config (the expensive, parallel work).
        jobs = [(str(p), str(prefix), cfg.cleaning.model_dump(), cfg.dedup.model_dump())
                for p, prefix, cache in zip(parts, prefixes, caches) if not all(f.exists() for f in cache.values())]
        log(f"cleaned_shards: {len(parts)} raw parts, {len(jobs)} to clean, {len(parts) - len(jobs)} cached")
        summaries = {jobs[i][1]: summary for i, summary in engine.map(
            clean_part, jobs, what="cleaning parts", total=len(jobs), sizes=lambda summary: summary["bytes_in"],
            workers=cfg.cleaning.num_workers)}

        # 2. Corpus-wide dedup, from the cached hashes and signatures only; 3. the parts' outputs.
        removed_units, candidates_checked = _duplicates(cfg, engine, caches, root, log)
        source_names = SourceNames(*raw_source_names(cfg))
        finish_jobs = ((cache, removed, shards_dir / name, removed_dir / name, previous.get(prefix.name), source_names)
                       for cache, removed, name, prefix in zip(caches, removed_units, names, prefixes))
        entries: list[dict] = [{} for _ in parts]
        for i, entry in engine.map(_finish_part, finish_jobs, what="dedup + write", total=len(parts),
                                   sizes=lambda entry: entry["num_bytes_in"]):
            entries[i] = entry
        tasks_per_node = dict(engine.tasks_per_node)

    preview: list[dict] = []
    totals: Counter = Counter()
    filtered_by_rule: Counter = Counter()
    pii: Counter = Counter()
    per_source: dict[str, dict] = {}
    for raw, prefix, name, entry in zip(parts, prefixes, names, entries):
        old = previous.get(prefix.name)
        pii_counts = summaries.get(str(prefix), {}).get("pii")
        if pii_counts is None:  # cleaned in an earlier run: its PII counts were recorded then
            pii_counts = old.get("pii", {}) if old else {}
        entry.update({"cache": prefix.name, "raw_part": raw.name, "name": name, "pii": pii_counts})
        _quarantine_cleaning_failures(cfg, prefix.name, summaries.get(str(prefix)))
        if len(preview) < 5:
            preview += _preview(shards_dir / name, 5 - len(preview))
        for key in ("num_documents_in", "num_kept", "num_exact_duplicates", "num_near_duplicates",
                    "num_quarantined", "num_bytes_in", "num_bytes_out"):
            totals[key] += entry[key]
        filtered_by_rule.update(entry["filtered_by_rule"])
        pii.update(pii_counts)
        add_source_counts(per_source, entry["sources"])
    written = sum(entry.pop("written") for entry in entries)

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
        num_candidates_checked=candidates_checked(), tasks_per_node=tasks_per_node, sources=per_source,
        parts=entries, shards_dir=shards_dir, data_version=short_hash([e["removed_key"] + e["cache"] for e in entries]),
        preview=preview,
    )
    log(f"cleaned_shards: {result.num_documents_in} in, {result.num_kept} kept, {result.num_filtered} filtered, "
        f"{result.num_exact_duplicates} exact dups, {result.num_near_duplicates} near dups, "
        f"{result.num_quarantined} quarantined; {written} shards written")
    if result.num_kept == 0:
        raise EmptyCorpusError(f"cleaning kept no document of {result.num_documents_in}: "
                               f"filtered by rule {result.filtered_by_rule}",
                               next_step="loosen the `cleaning` rules that removed them (null turns a rule off)")
    return result


def _write_outputs(cache_table: Path, removed: dict[int, tuple[str, str | None]], shard_path: Path,
                   removed_path: Path, names: SourceNames, sources: dict[str, dict]) -> tuple[int, int]:
    """Write the kept pieces of one part and the ledger of its removed pieces; returns the text bytes in
    and out, and adds each source's to `sources`. Batch by batch with Arrow filtering (no per-row Python;
    memory bounded by a batch, not the part)."""
    for c in sources.values():
        c.update(bytes_in=0, bytes_out=0)
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
            for side, rows_of_side in (("bytes_in", batch), ("bytes_out", kept)):
                sizes = pa.table({"uri": rows_of_side.column("source"),
                                  "n": pc.binary_length(rows_of_side.column("text"))}).group_by("uri").aggregate(
                    [("n", "sum")])
                for uri, n in zip(sizes.column("uri").to_pylist(), sizes.column("n_sum").to_pylist()):
                    sources[names.by_uri.get(uri, uri)][side] += n
            start += batch.num_rows
    reasons, duplicate_of = zip(*(removed[r] for r in removed_rows.tolist())) if len(removed) else ((), ())
    write_table(removed_path, pa.table({**ledger, "reason": reasons, "duplicate_of": duplicate_of},
                                       schema=REMOVED_SCHEMA))
    return bytes_in, bytes_out


def add_source_counts(total: dict[str, dict], part: dict[str, dict]) -> None:
    """Add one part's per-source counts into `total` (counts and filtered_by_rule alike)."""
    for name, counts in part.items():
        into = total.setdefault(name, {"filtered_by_rule": {}})
        for key, value in counts.items():
            if key == "filtered_by_rule":
                into[key] = dict(Counter(into[key]) + Counter(value))
            else:
                into[key] = into.get(key, 0) + value


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
