"""Evaluate a trained model: validation loss, perplexity, bits per byte, multiple-choice tasks
(llm_core/evaluation/multiple_choice.py) and seeded samples."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
import xxhash

from llm_core.data import task_items
from llm_core.evaluation import multiple_choice
from llm_core import tracking
from llm_core.model_files import latest_model, load_model
from llm_core.config import ScratchConfig
from llm_core.files import atomic_path, read_json, write_json
from llm_core.registry.generate import TextGenerator
from llm_core.layout import DATASET_DIR, EVALUATION_DIR, MODEL_TOKENIZER_SUBDIR, REPORT_FILE
from llm_core.training.loader import memory_map
from llm_core.model import Transformer
from llm_core.data.tokenized_dataset import task_files, unchecked_tasks
from llm_core.data.tokenizer import load_tokenizer


EVAL_TOKENS_PER_BATCH = 16384  # forward-only, no grad: batches much larger than training's


@dataclasses.dataclass
class EvalResult:
    val_loss: float  # mean nats per validation token
    perplexity: float
    val_bpb: float  # bits per UTF-8 byte of validation text
    num_val_tokens: int
    num_val_documents: int  # the documents scored: all, or a sample of evaluation.max_val_tokens
    val_tokens_per_second: float  # the forward-only scoring's throughput
    per_document: pa.Table  # id, doc_id, source, tokens, bytes, nats: one row per validation document scored
    per_source: dict[str, dict]  # source name -> bpb, documents, tokens, bytes of its documents scored
    samples: list[dict]  # {"prompt", "completion"}
    tasks: list[multiple_choice.TaskScore]  # the built-in task, then one per evaluation.tasks entry
    unchecked_tasks: list[str]  # tasks not checked for contamination when tokenized_dataset was built

    @property
    def core(self) -> float:
        return multiple_choice.core(self.tasks)


def validation_documents(dataset_dir: Path, max_tokens: int) -> tuple[pa.Table, np.ndarray]:
    """The validation documents to score and their tokens, concatenated: every document when the split
    has at most max_tokens tokens, else the documents with the smallest hashes of their ids up to
    max_tokens. The sample depends only on the dataset, so every model is scored on the same documents
    (paired comparisons), and it grows stably with the corpus."""
    manifest = read_json(dataset_dir / "manifest.json")
    if not manifest:
        raise FileNotFoundError(f"no tokenized dataset under {dataset_dir}: materialize `tokenized_dataset`")
    tables, arrays = [], []
    for shard in manifest["shards"]:
        stem = Path(shard["name"]).stem
        docs = pa.ipc.open_file(pa.memory_map(str(dataset_dir / "val" / f"{stem}.docs.arrow"))).read_all()
        tables.append(docs.append_column("shard", pa.array(np.full(len(docs), len(arrays)))))
        arrays.append(memory_map(dataset_dir / "val" / f"{stem}.tokens.arrow", "tokens"))
    docs = pa.concat_tables(tables)
    lengths = docs.column("length").to_numpy()
    if lengths.sum() > max_tokens:
        order = np.argsort([xxhash.xxh3_64_intdigest(i.encode()) for i in docs.column("id").to_pylist()],
                           kind="stable")
        keep = order[:max(1, int(np.searchsorted(np.cumsum(lengths[order]), max_tokens, side="right")))]
        docs = docs.take(np.sort(keep))  # in file order again: reads stay sequential
    shard, start, length = (docs.column(c).to_numpy() for c in ("shard", "start", "length"))
    stream = np.concatenate([arrays[a][s:s + n] for a, s, n in zip(shard, start, length)]).astype(np.int64)
    if "source" not in docs.column_names:  # a dataset tokenized before sources were named: one source
        docs = docs.append_column("source", pa.array(["corpus"] * len(docs), pa.string()))
    return docs.select(["id", "doc_id", "source", "length", "num_bytes"]), stream


@torch.no_grad()
def document_scores(model: Transformer, dataset_dir: Path, max_tokens: int) -> tuple[pa.Table, float]:
    """Nats of every validation document scored (validation_documents): the documents' tokens as one
    stream cut into non-overlapping block_size windows, each token predicted once (all but the very
    first). Returns (id, doc_id, source, tokens, bytes, nats per document; tokens per second)."""
    model.eval()
    docs, stream = validation_documents(dataset_dir, max_tokens)
    block = model.args.block_size
    nats = np.zeros(len(stream), dtype=np.float64)  # nats[i]: the loss of predicting stream[i]
    starts = list(range(0, len(stream) - 1, block))
    batch = max(1, EVAL_TOKENS_PER_BATCH // block)
    began = time.perf_counter()
    for i in range(0, len(starts), batch):
        chunk = starts[i:i + batch]
        x = torch.zeros((len(chunk), block), dtype=torch.long)
        y = torch.full((len(chunk), block), -100, dtype=torch.long)  # -100: past the end, not scored
        for row, s in enumerate(chunk):
            piece = torch.from_numpy(stream[s:s + block + 1])
            x[row, :len(piece) - 1], y[row, :len(piece) - 1] = piece[:-1], piece[1:]
        logits, _ = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(len(chunk), block)
        for row, s in enumerate(chunk):
            n = min(block, len(stream) - 1 - s)
            nats[s + 1:s + 1 + n] = loss[row, :n].double().numpy()
    seconds = time.perf_counter() - began
    lengths = docs.column("length").to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    scored = lengths.copy()
    scored[0] -= 1  # the stream's first token has no context
    table = pa.table({"id": docs.column("id"), "doc_id": docs.column("doc_id"), "source": docs.column("source"),
                      "tokens": scored,
                      "bytes": docs.column("num_bytes"), "nats": np.add.reduceat(nats, offsets)})
    return table, (len(stream) - 1) / max(seconds, 1e-9)


def per_source_scores(per_document: pa.Table) -> dict[str, dict]:
    """Source name -> bits per byte over its scored documents (and how many documents, tokens, bytes)."""
    sums = per_document.group_by("source").aggregate([("nats", "sum"), ("bytes", "sum"), ("tokens", "sum"),
                                                      ("id", "count")])
    return {name: {"bpb": nats / math.log(2) / max(num_bytes, 1), "documents": n, "tokens": tokens, "bytes": num_bytes}
            for name, nats, num_bytes, tokens, n in zip(*(sums.column(c).to_pylist() for c in (
                "source", "nats_sum", "bytes_sum", "tokens_sum", "id_count")))}


def source_metrics(per_source: dict[str, dict]) -> dict[str, float]:
    """eval/<source>/bpb of every source scored."""
    return {f"eval/{name}/bpb": s["bpb"] for name, s in per_source.items()}


def evaluate(cfg: ScratchConfig, model: Transformer, tokenizer_dir: Path) -> EvalResult:
    e = cfg.evaluation
    dataset_dir = cfg.data_path / DATASET_DIR
    items_of = {name: task_items.load_task(path) for name, path in task_files(cfg).items()}  # bad files: first
    per_document, tokens_per_second = document_scores(model, dataset_dir, e.max_val_tokens)
    nats, scored, text_bytes = (pc.sum(per_document.column(c)).as_py() for c in ("nats", "tokens", "bytes"))
    loss = nats / max(scored, 1)
    tokenizer = load_tokenizer(tokenizer_dir)
    tasks = [multiple_choice.score_task(name, items, model, tokenizer) for name, items in items_of.items()]
    generator = TextGenerator(model, tokenizer)
    samples = [{"prompt": p, "completion": generator.complete(p, max_new_tokens=e.max_new_tokens,
                                                               temperature=e.temperature, seed=e.seed)}
               for p in e.prompts]
    return EvalResult(val_loss=loss, perplexity=math.exp(loss), val_bpb=nats / math.log(2) / text_bytes,
                      num_val_tokens=scored, num_val_documents=len(per_document),
                      val_tokens_per_second=tokens_per_second, per_document=per_document,
                      per_source=per_source_scores(per_document), samples=samples,
                      tasks=tasks, unchecked_tasks=unchecked_tasks(cfg))


PER_DOCUMENT_FILE = "per_document.parquet"  # id, doc_id, source, tokens, bytes, nats: paired comparisons
TASK_ITEMS_FILE = "task_items.parquet"  # task, id, correct, correct_norm


def report_path(cfg: ScratchConfig, training_key: str) -> Path:
    return cfg.data_path / EVALUATION_DIR / training_key / REPORT_FILE


def write_parquet(path: Path, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


@dataclasses.dataclass
class Evaluation:
    result: EvalResult
    report: Path  # model_evaluation/<training key>/report.json
    latest: dict  # the training evaluated (see checkpoint.latest_model)


def save_evaluation(cfg: ScratchConfig, r: EvalResult, out_dir: Path) -> Path:
    """report.json, per_document.parquet and task_items.parquet in out_dir; returns the report's path."""
    write_parquet(out_dir / PER_DOCUMENT_FILE, r.per_document)
    write_parquet(out_dir / TASK_ITEMS_FILE, pa.Table.from_pylist(
        [{"task": t.name, **item} for t in r.tasks for item in t.per_item],
        schema=pa.schema([("task", pa.string()), ("id", pa.string()), ("correct", pa.bool_()),
                          ("correct_norm", pa.bool_())])))
    write_json(out_dir / REPORT_FILE, {
        "val_loss": r.val_loss, "perplexity": r.perplexity, "val_bpb": r.val_bpb, "num_val_tokens": r.num_val_tokens,
        "num_val_documents": r.num_val_documents, "val_tokens_per_second": r.val_tokens_per_second,
        "per_source": r.per_source,
        "samples": r.samples, "tasks": [t.summary() for t in r.tasks], "core": r.core if r.tasks else None,
        "unchecked_tasks": r.unchecked_tasks, "evaluation": cfg.evaluation.model_dump()})
    return out_dir / REPORT_FILE


def evaluate_latest(cfg: ScratchConfig, tracking_uri: str) -> Evaluation:
    """The model_evaluation stage: evaluate the latest healthy training (see evaluate_training)."""
    return evaluate_training(cfg, latest_model(cfg), tracking_uri)


def evaluate_training(cfg: ScratchConfig, latest: dict, tracking_uri: str) -> Evaluation:
    """Evaluate a training ({"key", "path", "mlflow_run_id", "tracking_uri"}), write its report and
    scores, and log them with the samples into its MLflow run."""
    r = evaluate(cfg, load_model(latest["path"]), Path(latest["path"]) / MODEL_TOKENIZER_SUBDIR)
    report = save_evaluation(cfg, r, report_path(cfg, latest["key"]).parent)
    task_metrics = {k: v for t in r.tasks for k, v in t.metrics().items()} | source_metrics(r.per_source)
    if r.tasks:
        task_metrics["eval/core"] = r.core
    tracking.log_evaluation(latest.get("tracking_uri") or tracking_uri, latest["mlflow_run_id"],
                            {"val_loss": r.val_loss, "perplexity": r.perplexity, "val_bpb": r.val_bpb}, r.samples,
                            task_metrics, files=[report.parent / PER_DOCUMENT_FILE, report.parent / TASK_ITEMS_FILE])
    return Evaluation(r, report, latest)
