"""The raw_corpus stage, incremental by shard: source files read into Parquet shards of pieces.

Source files are grouped into shards (a new file joins a new shard; a file keeps its shard for
life). A shard is rebuilt only when one of its files changes or disappears; its id is a hash of its
files' fingerprints and the read options, so an unchanged shard is reused as is. A row is a piece of
at most corpus.max_document_bytes; `doc_id` names its source document (see shards.py). In the files
of corpus.pieces_are_documents, every piece is a document of its own.

Layout under data_dir:
  raw_corpus/manifest.json, raw_corpus/shards/<shard>-<part>.parquet   (id, doc_id, source, text)
  quarantine/raw_corpus/*.jsonl (+ files/)   unusable files and records, each with its reason
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import xxhash

from llm_core.config import ScratchConfig
from llm_core.data.ingest import BadFile, BadRecord, ReadOptions, read_source
from llm_core.data.progress import Log
from llm_core.data.shards import ShardWriter
from llm_core.data.engine import data_engine
from llm_core.errors import DataError
from llm_core.data.sources import SourceFile, discover, discover_sources
from llm_core.files import Quarantine, read_json, remove_stale_files, short_hash, write_json
from llm_core.layout import QUARANTINE_DIR, RAW_CORPUS_DIR


# Bumped when a shard's manifest entry gains fields (2: counts per file, for counts per source).
RAW_LAYOUT_VERSION = 2


class EmptyCorpusError(DataError):
    """A stage produced no documents at all (raw_corpus, or cleaned_shards when cleaning keeps nothing)."""


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
    tasks_per_node: dict[str, int]  # where the shards were built (engine.kind: ray spreads them)
    sources: dict[str, dict[str, int]]  # source name -> its counts (per_source_counts)
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


def file_key(f: SourceFile) -> str:
    """The prefix of a file's document ids (`<file key>-<n>`): names the file, and with it the source,
    of any document id."""
    return xxhash.xxh3_64_hexdigest(f.id_key.encode())[:12]


def _build_raw_shard(shard_id: str, files: list[SourceFile], opts: ReadOptions, out_dir: Path,
                     quarantine_dir: Path, target_bytes: int, pieces_are_documents: set[str]) -> dict:
    writer = ShardWriter(out_dir, shard_id, target_bytes)
    quarantine = Quarantine(quarantine_dir, shard_id)
    per_file = []
    try:
        for f in files:
            # Ids: `<file key>-<n>`, n counting the documents and bad records of the file in order, and
            # `<doc id>#<k>` for the k-th piece after the first of a document that was cut.
            key = file_key(f)
            counts = {"documents": 0, "source_documents": 0, "bytes": 0, "quarantined_records": 0, "bad_file": 0}
            number, doc_id = 0, ""
            try:
                for item in read_source(f, opts):
                    if isinstance(item, BadRecord):
                        quarantine.add_record(f.uri, item.reason, item.record, item.location)
                        counts["quarantined_records"] += 1
                        number += 1
                        continue
                    piece = 0 if f.uri in pieces_are_documents else item.piece
                    if piece == 0:
                        doc_id, number = f"{key}-{number:07d}", number + 1
                        counts["source_documents"] += 1
                    writer.add({"id": f"{doc_id}#{piece}" if piece else doc_id, "doc_id": doc_id,
                                "source": f.uri, "text": item.text})
                    counts["documents"] += 1
                    counts["bytes"] += len(item.text.encode())
            except BadFile as exc:
                quarantine.add_file(f.uri, str(exc), f.local_path())
                counts["bad_file"] = 1
            per_file.append({"uri": f.uri, "fingerprint": f.fingerprint, "key": key, "size": f.size,
                             "pieces_are_documents": f.uri in pieces_are_documents, **counts})
        parts = writer.close()
    except BaseException:
        writer.abort()
        raise
    quarantine.commit()
    total = lambda name: sum(f[name] for f in per_file)  # noqa: E731
    return {"id": shard_id, "files": per_file, "parts": parts, "num_documents": total("documents"),
            "num_source_documents": total("source_documents"), "num_bytes": total("bytes"),
            "num_source_bytes": sum(f.size for f in files), "num_quarantined_records": total("quarantined_records"),
            "num_quarantined_files": total("bad_file"), "quarantine_reasons": quarantine.reasons()}


def per_source_counts(shards: list[dict], source_of: dict[str, str]) -> dict[str, dict[str, int]]:
    """Source name -> files, documents (pieces), source documents, bytes and quarantined records/files."""
    out: dict[str, Counter] = {}
    for shard in shards:
        for f in shard["files"]:
            c = out.setdefault(source_of.get(f["uri"], f["uri"]), Counter())
            c["files"] += 1
            for name in ("documents", "source_documents", "bytes", "quarantined_records"):
                c[name] += f[name]
            c["quarantined_files"] += f["bad_file"]
    return {name: dict(c) for name, c in out.items()}


def build_raw_corpus(cfg: ScratchConfig, log: Log = print, warn: Log | None = None) -> RawCorpusResult:
    warn = warn or log
    root = cfg.data_path / RAW_CORPUS_DIR
    shards_dir, manifest_path = root / "shards", root / "manifest.json"
    quarantine_dir = cfg.data_path / QUARANTINE_DIR / RAW_CORPUS_DIR
    opts = _read_options(cfg)
    target_bytes = int(cfg.corpus.shard_size_mb * 1e6)

    found = discover_sources(cfg.corpus)
    log(f"found {len(found.files)} files ({sum(f.size for f in found.files) / 1e6:.1f} MB) in "
        f"{len(cfg.corpus.named_sources())} sources; {len(found.missing)} missing, {len(found.skipped)} skipped by "
        f"extension")
    for source, reason in found.missing:  # a typo next to a good source must not pass unnoticed
        warn(f"corpus.sources: {source!r} gives no file ({reason}); it is skipped and quarantined")
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
    shards: list[dict | None] = []
    jobs, job_shard, job_bytes = [], [], []
    for files in groups:
        shard_id = short_hash({"files": [(f.uri, f.fingerprint) for f in files], "options": dataclasses.asdict(opts),
                               "layout": RAW_LAYOUT_VERSION,
                          "shard_bytes": target_bytes,
                          "pieces_are_documents": [f.uri for f in files if f.uri in pieces_are_documents]})
        old = old_by_id.get(shard_id)
        if old and all((shards_dir / p).exists() for p in old["parts"]) and \
                (quarantine_dir / f"{shard_id}.jsonl").exists():
            shards.append(old)
        else:
            jobs.append((shard_id, files, opts, shards_dir, quarantine_dir, target_bytes, pieces_are_documents))
            job_shard.append(len(shards))
            job_bytes.append(sum(f.size for f in files))
            shards.append(None)  # built below
    built, reused = len(jobs), len(groups) - len(jobs)
    log(f"raw_corpus: {len(groups)} shards, {built} to build, {reused} unchanged")
    with data_engine(cfg.engine, log, cfg.data_path) as engine:
        for i, shard in engine.map(_build_raw_shard, jobs, what="raw_corpus shards", total=len(jobs),
                                   sizes=job_bytes):
            shards[job_shard[i]] = shard
        tasks_per_node = dict(engine.tasks_per_node)

    # Problems with the configured sources themselves (missing paths) are quarantined per run.
    source_problems = Quarantine(quarantine_dir, "sources")
    for source, reason in found.missing:
        source_problems.add_file(source, reason)
    source_problems.commit()

    for shard in shards:  # names follow the config (a renamed source needs no rebuild)
        for f in shard["files"]:
            f["source"] = found.source_of[f["uri"]]
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
        tasks_per_node=tasks_per_node, sources=per_source_counts(shards, found.source_of),
        parts=[shards_dir / p for s in shards for p in s["parts"]],
        data_version=short_hash([s["id"] for s in shards]), quarantine_dir=quarantine_dir,
    )
    log(f"raw_corpus: {result.num_documents} documents (pieces) of {result.num_source_documents} source "
        f"documents, {result.num_bytes / 1e6:.1f} MB, "
        f"{result.num_quarantined} quarantined, shards built {built}, reused {reused}")
    if result.num_documents == 0:
        missing = ", ".join(f"{source!r} ({reason})" for source, reason in found.missing)
        raise EmptyCorpusError(
            f"the corpus is empty: no usable document in corpus.sources {cfg.corpus.source_paths()}"
            + (f"; missing: {missing}" if missing else "")
            + f" ({result.num_quarantined} quarantined: {dict(reasons)}; see {quarantine_dir})",
            next_step="fix corpus.sources (`scratchllm check-config --config P` checks every source)")
    return result


def raw_parts(cfg: ScratchConfig) -> list[Path]:
    """The raw_corpus parts of the last materialization, in corpus order."""
    root = cfg.data_path / RAW_CORPUS_DIR
    manifest = read_json(root / "manifest.json")
    if not manifest:
        raise FileNotFoundError(f"raw_corpus has not been materialized under {root}")
    return [root / "shards" / p for s in manifest["shards"] for p in s["parts"]]


def source_names(cfg: ScratchConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(file URI -> source name, file key -> source name) as raw_corpus last recorded them: what the later
    stages name a document's source by (its `source` column, or the file key its doc_id starts with)."""
    manifest = read_json(cfg.data_path / RAW_CORPUS_DIR / "manifest.json")
    files = [f for s in manifest.get("shards", []) for f in s["files"]]
    return {f["uri"]: f["source"] for f in files}, {f["key"]: f["source"] for f in files}

