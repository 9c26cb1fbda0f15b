"""The two data stages, incremental by shard: `build_raw_corpus` and `build_cleaned_shards`.

raw_corpus: source files are grouped into shards (a new file joins a new shard; a file keeps its
shard for life). A shard is rebuilt only when one of its files changes or disappears; its id is
a hash of its files' fingerprints and the read options, so an unchanged shard is reused as is.
A row is a piece of at most corpus.max_document_bytes; `doc_id` names its source document (see
shards.py). In the files of corpus.pieces_are_documents, every piece is a document of its own.

cleaned_shards: every raw part is cleaned once per cleaning config (the expensive per-piece
work: normalization, PII, quality rules, MinHash) into a cache keyed by part + config. Quality
rules judge pieces; dedup judges whole source documents (the kept pieces of each, hashed and
shingled as one text), and a duplicate document is removed with all its pieces. Dedup runs over
the whole corpus from the cached hashes and signatures (cheap), and an output shard is rewritten
only when its set of kept pieces changed. Counts are of pieces (rows).

Layout under data_dir:
  raw_corpus/manifest.json, raw_corpus/shards/<shard>-<part>.parquet   (id, doc_id, source, text)
  cleaned_shards/manifest.json, cleaned_shards/shards/<part>.parquet   (id, doc_id, source, text)
  cleaned_shards/removed/<part>.parquet   (id, doc_id, source, reason, duplicate_of): every removed
                                          piece; duplicate_of is the doc_id of the document kept
  cleaned_shards/cache/...                per-part cleaning results
  cleaned_shards/dedup.tmp-*/             hashes spilled to disk during dedup (removed after)
  quarantine/<stage>/*.jsonl (+ files/)   unusable files and records, each with its reason
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from llm_core.layout import CLEANED_SHARDS_DIR, QUARANTINE_DIR, RAW_CORPUS_DIR
from llm_core.config import CleaningConfig, DedupConfig, ScratchConfig
from llm_core.data import clean, dedup, repeats
from llm_core.files import TMP_MARK, Quarantine, atomic_path, read_json, remove_stale_files, short_hash, write_json
from llm_core.data.ingest import BadFile, BadRecord, ReadOptions, read_source
from llm_core.data.shards import COMPRESSION, DOC_SCHEMA, ShardWriter, iter_batches, write_table
from llm_core.data.sources import SourceFile, discover

Log = Callable[[str], None]
# Per piece: its status, and for a kept piece the row of its document in the part's UNITS_SCHEMA table
# (the documents with at least one kept piece, in order: row k is row k of the signature arrays).
CACHE_SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("source", pa.string()),
                          ("text", pa.string()), ("status", pa.string()), ("unit", pa.int32())])
UNITS_SCHEMA = pa.schema([("doc_id", pa.string()), ("content_hash", pa.uint64())])
REMOVED_SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("source", pa.string()),
                            ("reason", pa.string()), ("duplicate_of", pa.string())])
KEPT = "kept"
QUARANTINED = "quarantined"


class EmptyCorpusError(RuntimeError):
    """A stage produced no documents at all."""


class _Progress:
    """Logs at most every few seconds: 'what: done/total, MB, MB/s'."""

    def __init__(self, log: Log, what: str, total: int, every: float = 5.0):
        self.log, self.what, self.total, self.every = log, what, total, every
        self.start = self.last = time.monotonic()

    def update(self, done: int, nbytes: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            mb = nbytes / 1e6
            self.log(f"{self.what}: {done}/{self.total}, {mb:.1f} MB, {mb / max(now - self.start, 1e-9):.1f} MB/s")


# ----------------------------------------------------------------------------------------------
# raw_corpus


@dataclasses.dataclass
class RawCorpusResult:
    num_documents: int  # pieces (rows)
    num_source_documents: int  # distinct doc_ids
    num_bytes: int  # UTF-8 bytes of document text
    num_source_bytes: int  # bytes of the input files as stored (maybe compressed)
    num_quarantined: int  # records + whole files + missing sources
    num_quarantined_records: int
    num_quarantined_files: int
    num_files: int
    num_skipped_files: int
    num_shards_built: int
    num_shards_reused: int
    quarantine_reasons: dict[str, int]
    parts: list[Path]
    data_version: str
    quarantine_dir: Path


def _read_options(cfg: ScratchConfig) -> ReadOptions:
    c = cfg.corpus
    return ReadOptions(c.txt_delimiter, c.max_document_bytes, c.jsonl_text_field, c.parquet_text_column)


def _group_new_files(files: list[SourceFile], target_bytes: int) -> list[list[SourceFile]]:
    groups: list[list[SourceFile]] = []
    size = target_bytes
    for f in files:
        if size >= target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += f.size
    return groups


def _build_raw_shard(shard_id: str, files: list[SourceFile], opts: ReadOptions, out_dir: Path,
                     quarantine_dir: Path, target_bytes: int, pieces_are_documents: set[str]) -> dict:
    writer = ShardWriter(out_dir, shard_id, target_bytes)
    quarantine = Quarantine(quarantine_dir, shard_id)
    num_docs = num_source_docs = num_bytes = bad_records = bad_files = 0
    try:
        for f in files:
            # Ids: `<file key>-<n>`, n counting the documents and bad records of the file in order, and
            # `<doc id>#<k>` for the k-th piece after the first of a document that was cut.
            file_key = xxhash.xxh3_64_hexdigest(f.id_key.encode())[:12]
            number, doc_id = 0, ""
            try:
                for item in read_source(f, opts):
                    if isinstance(item, BadRecord):
                        quarantine.add_record(f.uri, item.reason, item.record, item.location)
                        bad_records += 1
                        number += 1
                        continue
                    piece = 0 if f.uri in pieces_are_documents else item.piece
                    if piece == 0:
                        doc_id, number = f"{file_key}-{number:07d}", number + 1
                        num_source_docs += 1
                    writer.add({"id": f"{doc_id}#{piece}" if piece else doc_id, "doc_id": doc_id,
                                "source": f.uri, "text": item.text})
                    num_docs += 1
                    num_bytes += len(item.text.encode())
            except BadFile as exc:
                quarantine.add_file(f.uri, str(exc), f.local_path())
                bad_files += 1
        parts = writer.close()
    except BaseException:
        writer.abort()
        raise
    quarantine.commit()
    return {"id": shard_id, "files": [{"uri": f.uri, "fingerprint": f.fingerprint,
                                       "pieces_are_documents": f.uri in pieces_are_documents} for f in files],
            "parts": parts, "num_documents": num_docs, "num_source_documents": num_source_docs, "num_bytes": num_bytes,
            "num_source_bytes": sum(f.size for f in files), "num_quarantined_records": bad_records,
            "num_quarantined_files": bad_files, "quarantine_reasons": quarantine.reasons()}


def build_raw_corpus(cfg: ScratchConfig, log: Log = print) -> RawCorpusResult:
    root = cfg.data_path / RAW_CORPUS_DIR
    shards_dir, manifest_path = root / "shards", root / "manifest.json"
    quarantine_dir = cfg.data_path / QUARANTINE_DIR / RAW_CORPUS_DIR
    opts = _read_options(cfg)
    target_bytes = int(cfg.corpus.shard_size_mb * 1e6)

    found = discover(cfg.corpus.sources, cfg.corpus.extensions)
    log(f"found {len(found.files)} files ({sum(f.size for f in found.files) / 1e6:.1f} MB) in "
        f"{len(cfg.corpus.sources)} sources; {len(found.missing)} missing, {len(found.skipped)} skipped by extension")
    current = {f.uri: f for f in found.files}
    # Files that are collections of short texts (the bundled plays): each piece counts as a document.
    pieces_are_documents = {f.uri for f in discover(cfg.corpus.pieces_are_documents, cfg.corpus.extensions).files}

    # Keep the shard layout of the last run: each old shard keeps its surviving files.
    old_shards = read_json(manifest_path).get("shards", [])
    groups: list[list[SourceFile]] = []
    assigned: set[str] = set()
    for entry in old_shards:
        files = [current[f["uri"]] for f in entry["files"] if f["uri"] in current and f["uri"] not in assigned]
        if files:
            groups.append(files)
            assigned.update(f.uri for f in files)
    groups += _group_new_files([f for f in found.files if f.uri not in assigned], target_bytes)

    old_by_id = {entry["id"]: entry for entry in old_shards}
    shards, built, reused = [], 0, 0
    progress = _Progress(log, "raw_corpus shards", len(groups))
    done_bytes = 0
    for i, files in enumerate(groups):
        shard_id = short_hash({"files": [(f.uri, f.fingerprint) for f in files], "options": dataclasses.asdict(opts),
                          "shard_bytes": target_bytes,
                          "pieces_are_documents": [f.uri for f in files if f.uri in pieces_are_documents]})
        old = old_by_id.get(shard_id)
        if old and all((shards_dir / p).exists() for p in old["parts"]) and \
                (quarantine_dir / f"{shard_id}.jsonl").exists():
            shards.append(old)
            reused += 1
        else:
            shards.append(_build_raw_shard(shard_id, files, opts, shards_dir, quarantine_dir, target_bytes,
                                           pieces_are_documents))
            built += 1
        done_bytes += sum(f.size for f in files)
        progress.update(i + 1, done_bytes, force=i + 1 == len(groups))

    # Problems with the configured sources themselves (missing paths) are quarantined per run.
    source_problems = Quarantine(quarantine_dir, "sources")
    for source, reason in found.missing:
        source_problems.add_file(source, reason)
    source_problems.commit()

    write_json(manifest_path, {"shards": shards, "read_options": dataclasses.asdict(opts)})
    remove_stale_files(shards_dir, {p for s in shards for p in s["parts"]})
    live = {s["id"] for s in shards} | {"sources"}
    remove_stale_files(quarantine_dir, {f"{name}.jsonl" for name in live})
    copies = quarantine_dir / "files"  # whole-file copies are named <shard id>-<n>-<file name>
    remove_stale_files(copies, {p.name for p in copies.glob("*") if p.name.split("-")[0] in live})

    reasons = Counter(source_problems.reasons())
    for s in shards:
        reasons.update(s["quarantine_reasons"])
    bad_records = sum(s["num_quarantined_records"] for s in shards)
    bad_files = sum(s["num_quarantined_files"] for s in shards) + len(found.missing)
    result = RawCorpusResult(
        num_documents=sum(s["num_documents"] for s in shards),
        num_source_documents=sum(s["num_source_documents"] for s in shards),
        num_bytes=sum(s["num_bytes"] for s in shards),
        num_source_bytes=sum(s["num_source_bytes"] for s in shards),
        num_quarantined=bad_records + bad_files, num_quarantined_records=bad_records,
        num_quarantined_files=bad_files, num_files=len(found.files), num_skipped_files=len(found.skipped),
        num_shards_built=built, num_shards_reused=reused, quarantine_reasons=dict(reasons),
        parts=[shards_dir / p for s in shards for p in s["parts"]],
        data_version=short_hash([s["id"] for s in shards]), quarantine_dir=quarantine_dir,
    )
    log(f"raw_corpus: {result.num_documents} documents (pieces) of {result.num_source_documents} source "
        f"documents, {result.num_bytes / 1e6:.1f} MB, "
        f"{result.num_quarantined} quarantined, shards built {built}, reused {reused}")
    if result.num_documents == 0:
        raise EmptyCorpusError(
            f"the corpus is empty: no usable document in {cfg.corpus.sources} "
            f"({result.num_quarantined} quarantined: {dict(reasons)}; see {quarantine_dir})")
    return result


def raw_parts(cfg: ScratchConfig) -> list[Path]:
    """The raw_corpus parts of the last materialization, in corpus order."""
    root = cfg.data_path / RAW_CORPUS_DIR
    manifest = read_json(root / "manifest.json")
    if not manifest:
        raise FileNotFoundError(f"raw_corpus has not been materialized under {root}")
    return [root / "shards" / p for s in manifest["shards"] for p in s["parts"]]


@dataclasses.dataclass
class SourceChanges:
    """How corpus.sources differ from what raw_corpus last ingested (file URIs)."""

    new: list[str]
    changed: list[str]
    removed: list[str]

    def __bool__(self) -> bool:
        return bool(self.new or self.changed or self.removed)

    def summary(self) -> str:
        return f"{len(self.new)} new, {len(self.changed)} changed, {len(self.removed)} removed files"


def source_changes(cfg: ScratchConfig) -> tuple[SourceChanges, str]:
    """(what changed since the last raw_corpus, a fingerprint of the sources as they are now).
    Reads file listings only (size + mtime, or the store's ETag), never file contents."""
    found = discover(cfg.corpus.sources, cfg.corpus.extensions)
    now = {f.uri: f.fingerprint for f in found.files}
    shards = read_json(cfg.data_path / RAW_CORPUS_DIR / "manifest.json").get("shards", [])
    ingested = {f["uri"]: f["fingerprint"] for s in shards for f in s["files"]}
    changes = SourceChanges(new=sorted(now.keys() - ingested.keys()), removed=sorted(ingested.keys() - now.keys()),
                            changed=sorted(u for u in now.keys() & ingested.keys() if now[u] != ingested[u]))
    return changes, short_hash(sorted(now.items()))


def cleaned_shard_paths(cfg: ScratchConfig) -> list[Path]:
    """The cleaned_shards output files of the last materialization, in corpus order."""
    root = cfg.data_path / CLEANED_SHARDS_DIR
    parts = read_json(root / "manifest.json").get("parts")
    if not parts:
        raise FileNotFoundError(f"cleaned_shards has not been materialized under {root}")
    return [root / "shards" / part["name"] for part in parts]


# ----------------------------------------------------------------------------------------------
# cleaned_shards: per-part cleaning (in worker processes)


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
# cleaned_shards: corpus-wide dedup and outputs


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
    progress = _Progress(log, "cleaning parts", len(jobs))
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


class _CorpusDedup:
    """Which documents of the cleaned parts are exact or near duplicates, part by part in corpus order.

    The unit is a source document with at least one kept piece (its kept pieces hashed and shingled as
    one text by clean_part); a duplicate document is removed with all its kept pieces.
    The decisions are those of a single pass remembering every content hash and every LSH band key:
    the first document of each content hash is kept, and NearDupIndex keeps the first of each group
    of near duplicates among the rest. But only a hash or a key that another document shares can ever
    make a duplicate, so two cheap passes first find those (spilled to disk: repeats.RepeatedValues)
    and the deciding pass remembers nothing else. Memory grows with the number of duplicates and
    LSH candidates, not with the corpus.
      pass 1 (if exact): the content hashes that repeat;
      pass 2: the exact duplicates, and the band keys that repeat among the other documents;
      pass 3 (`removals`): near duplicates, indexing only the documents that have a repeated key.
    A document's ref is its index among all units in corpus order (a signature row).
    """

    def __init__(self, cfg: DedupConfig, parts: list[dict[str, Path]], work_dir: Path):
        self.cfg, self.parts = cfg, parts
        num_units = [len(_NpyRows(files["offsets"])) - 1 for files in parts]
        self.first_ref = np.cumsum([0] + num_units).tolist()
        self._arrays = functools.lru_cache(maxsize=32)(self._open)  # open files of the parts last read
        self.index = dedup.NearDupIndex(cfg, self._shingles_of, self._signature_of) if cfg.near else None
        self.exact: list[dict[int, tuple[str, str]]] = []  # per part: unit -> ("exact_duplicate", doc_id of the first)
        self.repeated_keys = repeats.EMPTY
        for leftover in work_dir.glob(f"dedup{TMP_MARK}*"):  # of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f"dedup{TMP_MARK}", dir=work_dir) as tmp:
            self._find_exact_and_repeated_keys(Path(tmp), sum(num_units))

    def _units(self, part: int, with_ids: bool = False) -> pa.Table:
        """The part's units: content_hash (and doc_id); row k is row k of its signature and shingle arrays."""
        return pq.read_table(self.parts[part]["units"], columns=["content_hash"] + ["doc_id"] * with_ids)

    def _offered(self, part: int, num_units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the units that are not exact duplicates, the part's signatures, their band keys)."""
        offered = np.flatnonzero(~np.isin(np.arange(num_units), list(self.exact[part])))
        signatures = np.load(self.parts[part]["signatures"])
        return offered, signatures, self.index.band_keys(signatures[offered])

    def _find_exact_and_repeated_keys(self, tmp: Path, num_units: int) -> None:
        repeated_hashes = repeats.EMPTY
        if self.cfg.exact:
            hashes = repeats.RepeatedValues(tmp / "hashes", num_units)
            for part in range(len(self.parts)):
                hashes.add(self._units(part).column("content_hash").to_numpy())
            repeated_hashes = hashes.repeated()
        keys = repeats.RepeatedValues(tmp / "keys", num_units * self.cfg.bands)
        first_with_hash: dict[int, str] = {}  # repeated hashes only
        for part in range(len(self.parts)):
            units = self._units(part, with_ids=self.cfg.exact)
            content = units.column("content_hash").to_numpy()
            exact = {}
            for k in np.flatnonzero(repeats.isin_sorted(content, repeated_hashes)).tolist():
                content_hash = int(content[k])
                if content_hash in first_with_hash:
                    exact[k] = ("exact_duplicate", first_with_hash[content_hash])
                else:
                    first_with_hash[content_hash] = units.column("doc_id")[k].as_py()
            self.exact.append(exact)
            if self.index is not None:
                keys.add(self._offered(part, units.num_rows)[2])
        self.repeated_keys = keys.repeated()

    def removals(self) -> Iterator[tuple[int, dict[int, tuple[str, str | None]]]]:
        """For each part in corpus order: (its number of pieces, its removed rows -> (reason, doc_id of the
        document it duplicates, or None when the cleaning removed the piece))."""
        id_of_ref: dict[int, str] = {}  # indexed documents only
        for part in range(len(self.parts)):
            units = self._units(part, with_ids=self.index is not None)
            removed_units: dict[int, tuple[str, str]] = {}
            if self.index is not None:
                offered, signatures, keys = self._offered(part, units.num_rows)
                shared = repeats.isin_sorted(keys, self.repeated_keys)
                for j in np.flatnonzero(shared.any(axis=1)).tolist():  # the others cannot match or be matched
                    k = int(offered[j])
                    ref = self.first_ref[part] + k
                    match = self.index.find_or_add(ref, signatures[k], self._shingles_of(ref),
                                                   keys=keys[j][shared[j]].tolist())
                    if match is None:
                        id_of_ref[ref] = units.column("doc_id")[k].as_py()
                    else:
                        removed_units[k] = ("near_duplicate", id_of_ref[match])
            removed_units.update(self.exact[part])
            self.exact[part] = {}
            table = pq.read_table(self.parts[part]["table"], columns=["status", "unit"])
            yield table.num_rows, _removed_rows(table, removed_units)
        self._arrays.cache_clear()  # closes the files

    def _locate(self, ref: int) -> tuple[dict[str, _NpyRows], int]:
        part = bisect.bisect_right(self.first_ref, ref) - 1
        return self._arrays(part), ref - self.first_ref[part]

    def _open(self, part: int) -> dict[str, _NpyRows]:
        return {name: _NpyRows(self.parts[part][name]) for name in ("signatures", "shingles", "offsets")}

    def _signature_of(self, ref: int) -> np.ndarray:
        arrays, k = self._locate(ref)
        return arrays["signatures"].rows(k, k + 1)[0]

    def _shingles_of(self, ref: int) -> np.ndarray:
        arrays, k = self._locate(ref)
        start, end = arrays["offsets"].rows(k, k + 2).tolist()
        return arrays["shingles"].rows(start, end)


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


class _NpyRows:
    """Rows of a .npy file read on demand with pread. Not a memory map: the pages of a map stay in the
    process's RSS until it is unmapped, and dedup reads scattered rows of every part."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        version = np.lib.format.read_magic(self._file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, self.dtype = read_header(self._file)
        self._len, self._shape = shape[0], shape[1:]
        self._row_bytes = self.dtype.itemsize * int(np.prod(self._shape))
        self._start = self._file.tell()

    def __len__(self) -> int:
        return self._len

    def rows(self, start: int, stop: int) -> np.ndarray:
        data = os.pread(self._file.fileno(), (stop - start) * self._row_bytes, self._start + start * self._row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(-1, *self._shape)


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
    duplicates = _CorpusDedup(cfg.dedup, [_cache_files(p) for p in prefixes], root)
    entries, preview = [], []
    written = 0
    totals: Counter = Counter()
    filtered_by_rule: Counter = Counter()
    pii: Counter = Counter()
    progress = _Progress(log, "dedup + write", len(parts))
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
