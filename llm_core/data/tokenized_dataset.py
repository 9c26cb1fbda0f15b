"""Encode the cleaned shards into Arrow IPC token files, train/val split by source document (all
pieces of a document on the same side), or by piece for a corpus of a few documents (llm_core/data/split.py).

Layout under data_dir/tokenized_dataset/:
  manifest.json                      per shard counts + the dtype, vocab size and EOT id
  {train,val}/<shard>.tokens.arrow   one uint16 (or uint32) column `tokens`, uncompressed so the
                                     loader can memory-map it; every piece ends with <|endoftext|>
  {train,val}/<shard>.docs.arrow     id (of the piece), doc_id, start, length (tokens, EOT included), num_bytes,
                                     source (the name of its corpus source)

Training pieces that share an n-gram with an evaluation task item are removed (or only listed, for
the blocking check to fail) as they are encoded: see llm_core/data/decontamination.py.

A shard is re-encoded only when its cleaned content, the tokenizer, the split or the evaluation
items changed.
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

from llm_core.data import task_items
from llm_core.config import ScratchConfig, resolve_path
from llm_core.data.shards import iter_batches
from llm_core.data.decontamination import EvalNgrams, eval_ngrams
from llm_core.data.raw_corpus import source_names
from llm_core.data.engine import data_engine
from llm_core.errors import DataError
from llm_core.files import atomic_path, read_json, remove_stale_files, short_hash, write_json
from llm_core.layout import CLEANED_SHARDS_DIR, DATASET_DIR
from llm_core.data.split import Split, SplitPlan, as_asked, plan_split
from llm_core.data.tokenizer import EOT

SPLITS = ("train", "val")
DOCS_SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("start", pa.int64()),
                         ("length", pa.int64()), ("num_bytes", pa.int64()), ("source", pa.string())])
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
    builtin_task_items: int  # items of the built-in multiple-choice task (llm_core/data/task_items.py)
    contamination: dict  # see contamination_summary
    sources: dict[str, dict[str, int]]  # see source_totals
    split: dict  # see split_report
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


def contaminated_pieces(shard: Path, cfg: ScratchConfig, split: Split, ngrams: EvalNgrams,
                        source_of: dict[str, str]) -> list[dict]:
    """The training pieces of a shard that share an n-gram with an evaluation item."""
    found = []
    for batch in iter_batches(shard, ["id", "doc_id", "text", "source"], batch_size=ENCODE_BATCH_DOCS):
        for piece_id, doc_id, text, uri in zip(*(batch.column(i).to_pylist() for i in range(4))):
            if not split.is_validation(piece_id, doc_id):
                item = ngrams.match(text)
                if item:
                    found.append({"id": piece_id, "doc_id": doc_id, "item": item, "source": source_of.get(uri, uri),
                                  "removed": cfg.dataset.decontamination == "remove"})
    return found


def encode_shard(tokenizer_json: str, shard: Path, out_dir: Path, cfg: ScratchConfig, split: Split,
                 dtype: np.dtype, ngrams: EvalNgrams | None, base_key: str, previous: dict | None,
                 source_of: dict[str, str]) -> dict:
    """Check one cleaned shard for contamination, then encode it into train and val token files unless
    the previous encoding stands (same inputs, same pieces removed); returns its manifest entry.
    A task of the data engine (it may run on another machine: the tokenizer travels as JSON)."""
    contaminated = contaminated_pieces(shard, cfg, split, ngrams, source_of) if ngrams else []
    removed = {c["id"] for c in contaminated if c["removed"]}
    entry = {"key": short_hash([base_key, sorted(removed)]), "base_key": base_key,
             "scan_key": scan_key(cfg, ngrams), "contaminated": contaminated}
    if previous and previous["key"] == entry["key"] and all(f.exists() for f in _shard_files(out_dir, shard)):
        return {**previous, **entry, "encoded": False}
    tokenizer = _encoder(tokenizer_json)
    eot = tokenizer.token_to_id(EOT)
    tokens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    docs: dict[str, dict[str, list]] = {s: {name: [] for name in DOCS_SCHEMA.names} for s in SPLITS}
    position = {s: 0 for s in SPLITS}
    for batch in iter_batches(shard, ["id", "doc_id", "text", "source"], batch_size=ENCODE_BATCH_DOCS):
        rows = [row for row in zip(*(batch.column(i).to_pylist() for i in range(4))) if row[0] not in removed]
        encodings = tokenizer.encode_batch_fast([text for _, _, text, _ in rows], add_special_tokens=False)
        for (piece_id, doc_id, text, uri), encoding in zip(rows, encodings):
            side = "val" if split.is_validation(piece_id, doc_id) else "train"
            array = np.empty(len(encoding.ids) + 1, dtype=dtype)
            array[:-1] = encoding.ids
            array[-1] = eot  # the boundary after every piece
            tokens[side].append(array)
            row = (piece_id, doc_id, position[side], len(array), len(text.encode()), source_of.get(uri, uri))
            for name, value in zip(DOCS_SCHEMA.names, row):
                docs[side][name].append(value)
            position[side] += len(array)
    for side in SPLITS:
        flat = np.concatenate(tokens[side]) if tokens[side] else np.empty(0, dtype=dtype)
        _write_ipc(out_dir / side / f"{shard.stem}.tokens.arrow", pa.table({"tokens": pa.array(flat)}))
        _write_ipc(out_dir / side / f"{shard.stem}.docs.arrow", pa.table(docs[side], schema=DOCS_SCHEMA))
        entry[side] = {"tokens": int(len(flat)), "documents": len(docs[side]["id"]),
                       "bytes": int(sum(docs[side]["num_bytes"])), "max_id": int(flat.max()) if len(flat) else -1,
                       "sources": _per_source(docs[side])}
    return {**entry, "encoded": True}


def _per_source(docs: dict[str, list]) -> dict[str, dict[str, int]]:
    """Source name -> tokens, documents (pieces) and bytes of one shard's split."""
    out: dict[str, dict[str, int]] = {}
    for name, length, num_bytes in zip(docs["source"], docs["length"], docs["num_bytes"]):
        c = out.setdefault(name, {"tokens": 0, "documents": 0, "bytes": 0})
        c["tokens"] += length
        c["documents"] += 1
        c["bytes"] += num_bytes
    return out


def source_totals(manifest: dict) -> dict[str, dict[str, int]]:
    """Source name -> train/val tokens, documents and bytes, and contaminated training documents."""
    out: dict[str, dict[str, int]] = {}
    for entry in manifest["shards"]:
        for side in SPLITS:
            for name, counts in entry[side]["sources"].items():
                c = out.setdefault(name, {f"{s}_{k}": 0 for s in SPLITS for k in ("tokens", "documents", "bytes")}
                                   | {"contaminated_documents": 0})
                for key, value in counts.items():
                    c[f"{side}_{key}"] += value
        for found in entry.get("contaminated", []):
            out[found["source"]]["contaminated_documents"] += 1
    return out


def scan_key(cfg: ScratchConfig, ngrams: EvalNgrams | None) -> str:
    """What a shard's contamination check depends on besides its content."""
    return f"{cfg.dataset.decontamination}:{ngrams.fingerprint if ngrams else None}"


def _shard_files(out_dir: Path, shard: Path) -> list[Path]:
    return [out_dir / split / f"{shard.stem}.{kind}.arrow" for split in SPLITS for kind in ("tokens", "docs")]


def tokenizer_hash(tokenizer_dir: Path) -> str:
    return short_hash((tokenizer_dir / "tokenizer.json").read_bytes())


VAL_TEXTS_FOR_TASK = 2000  # validation pieces the built-in task draws from: enough variety, bounded reading


def builtin_task_path(cfg: ScratchConfig) -> Path:
    return cfg.data_path / DATASET_DIR / "tasks" / f"{task_items.BUILTIN_TASK}.jsonl"


def task_files(cfg: ScratchConfig) -> dict[str, Path]:
    """name -> JSONL of every evaluation task: the built-in one (once made) and evaluation.tasks."""
    builtin = builtin_task_path(cfg)
    return {**({task_items.BUILTIN_TASK: builtin} if builtin.is_file() else {}),
            **{t.name: resolve_path(t.path) for t in cfg.evaluation.tasks}}


def unchecked_tasks(cfg: ScratchConfig) -> list[str]:
    """Tasks whose current file was not checked for contamination when tokenized_dataset was built
    (added or edited since, or dataset.decontamination: off)."""
    checked = read_json(cfg.data_path / DATASET_DIR / "manifest.json").get("decontamination", {}).get("tasks", {})
    return [name for name, path in task_files(cfg).items() if checked.get(name) != short_hash(path.read_bytes())]


def contamination_summary(manifest: dict) -> dict:
    """What the decontamination found, from the manifest: mode, n, items checked, and the contaminated
    training pieces (id, doc_id, the item matched, removed or kept)."""
    found = [c for e in manifest["shards"] for c in e.get("contaminated", [])]
    return {**manifest.get("decontamination", {}), "documents": found, "num_contaminated_documents": len(found),
            "num_removed": sum(c["removed"] for c in found)}


def verify_decontamination(cfg: ScratchConfig) -> tuple[bool, str]:
    """No training piece that shares an n-gram with an evaluation item is left in the training split."""
    c = contamination_summary(read_json(cfg.data_path / DATASET_DIR / "manifest.json"))
    if c.get("mode") == "off":
        return True, "not checked: dataset.decontamination is off"
    kept = [d for d in c["documents"] if not d["removed"]]
    listed = "; ".join(f"{d['id']} (document {d['doc_id']}) matches {d['item']}" for d in (kept or c["documents"])[:10])
    head = (f"{c['items_checked']} evaluation items checked for shared {c['ngram']}-grams "
            f"({c['items_too_short']} too short to check)")
    if kept:
        return False, (f"{head}: {len(kept)} contaminated training documents kept (dataset.decontamination: fail): "
                       f"{listed}")
    return True, f"{head}: {c['num_removed']} contaminated training documents removed" + (f": {listed}" * bool(listed))


def val_texts(cfg: ScratchConfig, shards: list[Path], split: Split) -> list[str]:
    """The first VAL_TEXTS_FOR_TASK validation pieces long enough for the built-in task, in shard order."""
    texts: list[str] = []
    if cfg.dataset.builtin_task_items == 0:
        return texts
    for shard in shards:
        for batch in iter_batches(shard, ["id", "doc_id", "text"], batch_size=ENCODE_BATCH_DOCS):
            for piece_id, doc_id, text in zip(*(batch.column(i).to_pylist() for i in range(3))):
                if split.is_validation(piece_id, doc_id) and \
                        len(text.split()) >= task_items.CONTEXT_WORDS + task_items.CONTINUATION_WORDS:
                    texts.append(text)
                    if len(texts) == VAL_TEXTS_FOR_TASK:
                        return texts
    return texts


def split_report(plan: SplitPlan, total: dict) -> dict:
    """The split as made: its unit and why, and per side source documents, pieces, bytes and tokens."""
    tokens = total["train"]["tokens"] + total["val"]["tokens"]
    num_bytes = total["train"]["bytes"] + total["val"]["bytes"]
    return {"unit": plan.split.unit, "reason": plan.reason, "val_fraction": plan.split.fraction,
            "train_documents": plan.train_documents, "val_documents": plan.val_documents,
            "train_pieces": total["train"]["documents"], "val_pieces": total["val"]["documents"],
            "train_bytes": total["train"]["bytes"], "val_bytes": total["val"]["bytes"],
            "train_tokens": total["train"]["tokens"], "val_tokens": total["val"]["tokens"],
            "val_share_documents": plan.val_documents / max(plan.num_documents, 1),
            "val_share_bytes": total["val"]["bytes"] / max(num_bytes, 1),
            "val_share_tokens": total["val"]["tokens"] / max(tokens, 1),
            "as_asked": as_asked(total["val"]["bytes"], num_bytes, plan.split.fraction)}


def build_tokenized_dataset(cfg: ScratchConfig, tokenizer: Tokenizer, tokenizer_dir: Path,
                            log: Callable[[str], None] = print,
                            warn: Callable[[str], None] | None = None) -> DatasetResult:
    warn = warn or log
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    out_dir = cfg.data_path / DATASET_DIR
    cleaned = read_json(cfg.data_path / CLEANED_SHARDS_DIR / "manifest.json").get("parts")
    if not cleaned:
        raise FileNotFoundError(f"cleaned_shards has not been materialized under {cfg.data_path / CLEANED_SHARDS_DIR}")
    shards = [cfg.data_path / CLEANED_SHARDS_DIR / "shards" / part["name"] for part in cleaned]
    plan = plan_split(cfg, shards)
    log(f"tokenized_dataset: split {plan.reason}")
    tok_hash = tokenizer_hash(tokenizer_dir)
    previous = {e["name"]: e for e in read_json(out_dir / "manifest.json").get("shards", [])}
    builtin_items = task_items.build_continuation_task(val_texts(cfg, shards, plan.split), builtin_task_path(cfg),
                                                  cfg.dataset.builtin_task_items, cfg.dataset.seed)
    log(f"tokenized_dataset: built-in task '{task_items.BUILTIN_TASK}', {builtin_items} items from the validation "
        f"split")
    d = cfg.dataset
    ngrams = None if d.decontamination == "off" else eval_ngrams(task_files(cfg), d.decontamination_ngram)
    if ngrams:
        log(f"tokenized_dataset: {ngrams.items_checked} evaluation items, {len(ngrams.hashes)} distinct "
            f"{ngrams.n}-grams to look for in the training split ({d.decontamination})")

    tokenizer_json = tokenizer.to_str()
    entries: list[dict] = []
    jobs, job_entry, job_bytes = [], [], []
    source_of, _ = source_names(cfg)
    for part, shard in zip(cleaned, shards):
        base_key = short_hash([part["cache"], part["removed_key"], tok_hash, dtype.name, *plan.split.key,
                               part["sources_key"]])
        old = previous.get(part["name"])
        if old and (old.get("base_key"), old.get("scan_key")) == (base_key, scan_key(cfg, ngrams)) and \
                all(f.exists() for f in _shard_files(out_dir, shard)):
            entries.append(old)
            continue
        # Re-checked against the evaluation items; re-encoded only if its tokens or removed pieces changed.
        jobs.append((tokenizer_json, shard, out_dir, cfg, plan.split, dtype, ngrams, base_key, old, source_of))
        job_entry.append(len(entries))
        job_bytes.append(part["num_bytes_out"])
        entries.append({"name": part["name"]})
    log(f"tokenized_dataset: {len(cleaned)} shards, {len(jobs)} to check and encode, "
        f"{len(cleaned) - len(jobs)} unchanged")
    start = time.perf_counter()
    with data_engine(cfg.engine, log, cfg.data_path) as engine:
        for i, entry in engine.map(encode_shard, jobs, what="tokenized shards", total=len(jobs), sizes=job_bytes):
            entries[job_entry[i]].update(entry)
        tasks_per_node = dict(engine.tasks_per_node)
    seconds = time.perf_counter() - start
    encoded = sum(entries[i].pop("encoded") for i in job_entry)
    reused = len(cleaned) - encoded

    total = {s: {k: sum(e[s][k] for e in entries) for k in ("tokens", "documents", "bytes")} for s in SPLITS}
    report = split_report(plan, total)
    manifest = {"shards": entries, "split": report, "dtype": dtype.name, "vocab_size": vocab_size,
                "sources": list(dict.fromkeys(source_of.values())),
                "eot_id": tokenizer.token_to_id(EOT), "tokenizer_hash": tok_hash,
                "decontamination": {"mode": d.decontamination, "ngram": d.decontamination_ngram,
                                    "items_checked": ngrams.items_checked if ngrams else 0,
                                    "items_too_short": ngrams.items_too_short if ngrams else 0,
                                    "tasks": {name: short_hash(path.read_bytes())
                                              for name, path in task_files(cfg).items()} if ngrams else {}}}
    write_json(out_dir / "manifest.json", manifest)
    contamination = contamination_summary(manifest)
    if contamination["documents"]:
        log(f"tokenized_dataset: {contamination['num_contaminated_documents']} training documents share an "
            f"n-gram with an evaluation item; {contamination['num_removed']} removed")
    for split in SPLITS:
        remove_stale_files(out_dir / split, {f"{Path(e['name']).stem}.{kind}.arrow"
                                             for e in entries for kind in ("tokens", "docs")})
    if not report["as_asked"]:
        warn(f"tokenized_dataset: the split holds out {report['val_share_bytes']:.1%} of the bytes, "
             f"{report['val_share_tokens']:.1%} of the tokens and {report['val_pieces']} of "
             f"{report['val_pieces'] + report['train_pieces']} pieces, far from dataset.val_fraction "
             f"{d.val_fraction:g} (training split {total['train']['bytes'] / 1e3:.1f} KB, validation "
             f"{total['val']['bytes'] / 1e3:.1f} KB): scores on so uneven a split mean little; add text to "
             f"corpus.sources for a split as asked")
    for name, counts in source_totals(manifest).items():
        if counts["val_documents"] == 0:
            warn(f"tokenized_dataset: source {name!r} has no validation document ({counts['train_documents']} "
                 f"training documents): it gets no score of its own (eval/{name}/bpb); give it more, smaller "
                 f"documents (corpus.max_document_bytes) or raise dataset.val_fraction")
    if total["train"]["tokens"] == 0 or total["val"]["tokens"] == 0:
        empty = "train" if total["train"]["tokens"] == 0 else "val"
        raise DataError(f"the {empty} split is empty ({total['train']['documents']} train / "
                        f"{total['val']['documents']} val pieces, split {plan.split.unit})",
                        next_step="add text to corpus.sources or change dataset.val_fraction "
                                  f"(now {d.val_fraction:g})")
    return DatasetResult(
        split=report,
        num_train_tokens=total["train"]["tokens"], num_val_tokens=total["val"]["tokens"],
        num_train_documents=total["train"]["documents"], num_val_documents=total["val"]["documents"],
        val_bytes=total["val"]["bytes"], num_bytes=total["train"]["bytes"] + total["val"]["bytes"],
        dtype=dtype.name, num_shards_encoded=encoded, num_shards_reused=reused, encode_seconds=seconds,
        tasks_per_node=tasks_per_node, builtin_task_items=builtin_items, contamination=contamination,
        sources=source_totals(manifest),
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
