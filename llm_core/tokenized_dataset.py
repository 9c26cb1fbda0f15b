"""Encode the cleaned shards into Arrow IPC token files, train/val split by source document (all
pieces of a document on the same side).

Layout under data_dir/tokenized_dataset/:
  manifest.json                      per shard counts + the dtype, vocab size and EOT id
  {train,val}/<shard>.tokens.arrow   one uint16 (or uint32) column `tokens`, uncompressed so the
                                     loader can memory-map it; every piece ends with <|endoftext|>
  {train,val}/<shard>.docs.arrow     id (of the piece), doc_id, start, length (tokens, EOT included), num_bytes

A shard is re-encoded only when its cleaned content, the tokenizer or the split changed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from llm_core import tasks
from llm_core.config import ScratchConfig
from llm_core.data.shards import iter_batches
from llm_core.engine import data_engine
from llm_core.files import atomic_path, read_json, remove_stale_files, short_hash, write_json
from llm_core.layout import CLEANED_SHARDS_DIR, DATASET_DIR
from llm_core.split import is_validation
from llm_core.tokenizer import EOT

SPLITS = ("train", "val")
DOCS_SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("start", pa.int64()),
                         ("length", pa.int64()), ("num_bytes", pa.int64())])
ENCODE_BATCH_DOCS = 512


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"tokenizer.vocab_size {vocab_size} does not fit in uint32")


@dataclasses.dataclass
class DatasetResult:
    num_train_tokens: int
    num_val_tokens: int
    num_train_documents: int
    num_val_documents: int
    val_bytes: int
    num_bytes: int
    dtype: str
    num_shards_encoded: int
    num_shards_reused: int
    encode_seconds: float
    tasks_per_node: dict[str, int]  # where the shards were encoded (engine.kind: ray spreads them)
    builtin_task_items: int  # items of the built-in multiple-choice task (llm_core/tasks.py)
    out_dir: Path
    data_version: str


def _write_ipc(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


@functools.lru_cache(maxsize=2)
def _encoder(tokenizer_json: str) -> Tokenizer:
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a boundary
    return tokenizer


def encode_shard(tokenizer_json: str, shard: Path, out_dir: Path, cfg: ScratchConfig, dtype: np.dtype) -> dict:
    """Encode one cleaned shard into train and val token files; returns its counts. A task of the
    data engine (it may run on another machine: the tokenizer travels as JSON)."""
    tokenizer = _encoder(tokenizer_json)
    eot = tokenizer.token_to_id(EOT)
    tokens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    docs: dict[str, dict[str, list]] = {s: {name: [] for name in DOCS_SCHEMA.names} for s in SPLITS}
    position = {s: 0 for s in SPLITS}
    for batch in iter_batches(shard, ["id", "doc_id", "text"], batch_size=ENCODE_BATCH_DOCS):
        ids, doc_ids, texts = (batch.column(i).to_pylist() for i in range(3))
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        for piece_id, doc_id, text, encoding in zip(ids, doc_ids, texts, encodings):
            split = "val" if is_validation(doc_id, cfg.dataset.val_fraction, cfg.dataset.seed) else "train"
            array = np.empty(len(encoding.ids) + 1, dtype=dtype)
            array[:-1] = encoding.ids
            array[-1] = eot  # the boundary after every piece
            tokens[split].append(array)
            row = (piece_id, doc_id, position[split], len(array), len(text.encode()))
            for name, value in zip(DOCS_SCHEMA.names, row):
                docs[split][name].append(value)
            position[split] += len(array)
    counts = {}
    for split in SPLITS:
        flat = np.concatenate(tokens[split]) if tokens[split] else np.empty(0, dtype=dtype)
        _write_ipc(out_dir / split / f"{shard.stem}.tokens.arrow", pa.table({"tokens": pa.array(flat)}))
        _write_ipc(out_dir / split / f"{shard.stem}.docs.arrow", pa.table(docs[split], schema=DOCS_SCHEMA))
        counts[split] = {"tokens": int(len(flat)), "documents": len(docs[split]["id"]),
                         "bytes": int(sum(docs[split]["num_bytes"])), "max_id": int(flat.max()) if len(flat) else -1}
    return counts


def val_bytes(manifest: dict) -> int:
    """UTF-8 bytes of the validation text: the denominator of bits per byte."""
    return sum(shard["val"]["bytes"] for shard in manifest["shards"])


def tokenizer_hash(tokenizer_dir: Path) -> str:
    return short_hash((tokenizer_dir / "tokenizer.json").read_bytes())


VAL_TEXTS_FOR_TASK = 2000  # validation pieces the built-in task draws from: enough variety, bounded reading


def builtin_task_path(cfg: ScratchConfig) -> Path:
    return cfg.data_path / DATASET_DIR / "tasks" / f"{tasks.BUILTIN_TASK}.jsonl"


def val_texts(cfg: ScratchConfig, cleaned: list[dict]) -> list[str]:
    """The first VAL_TEXTS_FOR_TASK validation pieces long enough for the built-in task, in shard order."""
    texts: list[str] = []
    if cfg.dataset.builtin_task_items == 0:
        return texts
    for part in cleaned:
        shard = cfg.data_path / CLEANED_SHARDS_DIR / "shards" / part["name"]
        for batch in iter_batches(shard, ["doc_id", "text"], batch_size=ENCODE_BATCH_DOCS):
            for doc_id, text in zip(*(batch.column(i).to_pylist() for i in range(2))):
                if is_validation(doc_id, cfg.dataset.val_fraction, cfg.dataset.seed) and \
                        len(text.split()) >= tasks.CONTEXT_WORDS + tasks.CONTINUATION_WORDS:
                    texts.append(text)
                    if len(texts) == VAL_TEXTS_FOR_TASK:
                        return texts
    return texts


def build_tokenized_dataset(cfg: ScratchConfig, tokenizer: Tokenizer, tokenizer_dir: Path,
                            log: Callable[[str], None] = print) -> DatasetResult:
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    out_dir = cfg.data_path / DATASET_DIR
    cleaned = read_json(cfg.data_path / CLEANED_SHARDS_DIR / "manifest.json").get("parts")
    if not cleaned:
        raise FileNotFoundError(f"cleaned_shards has not been materialized under {cfg.data_path / CLEANED_SHARDS_DIR}")
    tok_hash = tokenizer_hash(tokenizer_dir)
    previous = {e["name"]: e for e in read_json(out_dir / "manifest.json").get("shards", [])}

    tokenizer_json = tokenizer.to_str()
    entries: list[dict] = []
    jobs, job_entry, job_bytes = [], [], []
    for part in cleaned:
        shard = cfg.data_path / CLEANED_SHARDS_DIR / "shards" / part["name"]
        key = short_hash([part["cache"], part["removed_key"], tok_hash, dtype.name, cfg.dataset.val_fraction,
                          cfg.dataset.seed])
        files = [out_dir / s / f"{shard.stem}.{kind}.arrow" for s in SPLITS for kind in ("tokens", "docs")]
        old = previous.get(part["name"])
        if old and old["key"] == key and all(f.exists() for f in files):
            entries.append(old)
            continue
        jobs.append((tokenizer_json, shard, out_dir, cfg, dtype))
        job_entry.append(len(entries))
        job_bytes.append(part["num_bytes_out"])
        entries.append({"name": part["name"], "key": key})
    log(f"tokenized_dataset: {len(cleaned)} shards, {len(jobs)} to encode, {len(cleaned) - len(jobs)} unchanged")
    start = time.perf_counter()
    with data_engine(cfg.engine, log, cfg.data_path) as engine:
        for i, counts in engine.map(encode_shard, jobs, what="tokenized shards", total=len(jobs), sizes=job_bytes):
            entries[job_entry[i]].update(counts)
        tasks_per_node = dict(engine.tasks_per_node)
    seconds = time.perf_counter() - start
    encoded, reused = len(jobs), len(cleaned) - len(jobs)

    total = {s: {k: sum(e[s][k] for e in entries) for k in ("tokens", "documents", "bytes")} for s in SPLITS}
    write_json(out_dir / "manifest.json", {"shards": entries, "dtype": dtype.name, "vocab_size": vocab_size,
                                           "eot_id": tokenizer.token_to_id(EOT), "tokenizer_hash": tok_hash})
    for split in SPLITS:
        remove_stale_files(out_dir / split, {f"{Path(e['name']).stem}.{kind}.arrow"
                                             for e in entries for kind in ("tokens", "docs")})
    if total["train"]["tokens"] == 0 or total["val"]["tokens"] == 0:
        empty = "train" if total["train"]["tokens"] == 0 else "val"
        raise ValueError(f"the {empty} split is empty ({total['train']['documents']} train / "
                         f"{total['val']['documents']} val pieces): the split is by source document, so change "
                         f"dataset.val_fraction, add documents, or list a file of many short texts in "
                         f"corpus.pieces_are_documents")
    builtin_items = tasks.build_continuation_task(val_texts(cfg, cleaned), builtin_task_path(cfg),
                                                  cfg.dataset.builtin_task_items, cfg.dataset.seed)
    log(f"tokenized_dataset: built-in task '{tasks.BUILTIN_TASK}', {builtin_items} items from the validation split")
    return DatasetResult(
        num_train_tokens=total["train"]["tokens"], num_val_tokens=total["val"]["tokens"],
        num_train_documents=total["train"]["documents"], num_val_documents=total["val"]["documents"],
        val_bytes=total["val"]["bytes"], num_bytes=total["train"]["bytes"] + total["val"]["bytes"],
        dtype=dtype.name, num_shards_encoded=encoded, num_shards_reused=reused, encode_seconds=seconds,
        tasks_per_node=tasks_per_node, builtin_task_items=builtin_items,
        out_dir=out_dir, data_version=short_hash("".join(e["key"] for e in entries).encode()),
    )


def _split_files(out_dir: Path, manifest: dict):
    for entry in manifest["shards"]:
        for split in SPLITS:
            stem = Path(entry["name"]).stem
            yield entry, split, out_dir / split / f"{stem}.tokens.arrow", out_dir / split / f"{stem}.docs.arrow"


def verify_token_ids(cfg: ScratchConfig) -> tuple[bool, str]:
    """Every id is below the vocabulary size, and the dtype holds the vocabulary."""
    out_dir = cfg.data_path / DATASET_DIR
    manifest = read_json(out_dir / "manifest.json")
    vocab, dtype = manifest["vocab_size"], np.dtype(manifest["dtype"])
    problems = [] if np.iinfo(dtype).max >= vocab - 1 else [f"dtype {dtype} cannot hold vocab {vocab}"]
    largest = -1
    for entry, split, tokens_path, _ in _split_files(out_dir, manifest):
        tokens = pa.ipc.open_file(pa.memory_map(str(tokens_path))).read_all().column("tokens").to_numpy()
        if tokens.dtype != dtype:
            problems.append(f"{tokens_path.name} ({split}) is {tokens.dtype}, expected {dtype}")
        if len(tokens):
            largest = max(largest, int(tokens.max()))
    if largest >= vocab:
        problems.append(f"token id {largest} >= vocab size {vocab}")
    return not problems, "; ".join(problems) or f"max id {largest} < vocab {vocab}; dtype {dtype}"


def verify_token_accounting(cfg: ScratchConfig, tokenizer: Tokenizer, docs_per_shard: int = 20) -> tuple[bool, str]:
    """Token files hold exactly the documents' tokens: lengths add up, and a sample of documents
    re-encoded now gives the very ids stored (plus the EOT boundary)."""
    out_dir = cfg.data_path / DATASET_DIR
    manifest = read_json(out_dir / "manifest.json")
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.encode_special_tokens = True
    problems, checked = [], 0
    for entry, split, tokens_path, docs_path in _split_files(out_dir, manifest):
        tokens = pa.ipc.open_file(pa.memory_map(str(tokens_path))).read_all().column("tokens").to_numpy()
        docs = pa.ipc.open_file(pa.memory_map(str(docs_path))).read_all()
        lengths = docs.column("length").to_numpy()
        if int(lengths.sum()) != len(tokens) or len(tokens) != entry[split]["tokens"]:
            problems.append(f"{tokens_path.name} ({split}): {len(tokens)} tokens, documents add up to "
                            f"{int(lengths.sum())}, manifest says {entry[split]['tokens']}")
            continue
        sample = dict(zip(docs.column("id").to_pylist()[:docs_per_shard],
                          zip(docs.column("start").to_pylist(), lengths.tolist())))
        for batch in iter_batches(cfg.data_path / CLEANED_SHARDS_DIR / "shards" / entry["name"], ["id", "text"]):
            for piece_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if piece_id in sample:
                    start, length = sample[piece_id]
                    expected = tokenizer.encode(text, add_special_tokens=False).ids + [manifest["eot_id"]]
                    if tokens[start:start + length].tolist() != expected:
                        problems.append(f"document {piece_id}: stored tokens differ from the tokenizer's")
                    checked += 1
    return not problems, "; ".join(problems[:5]) or f"{checked} sampled documents re-encoded identically"
