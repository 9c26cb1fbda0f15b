"""Evaluate a trained model: validation loss, perplexity, bits per byte, multiple-choice tasks
(llm_core/tasks.py) and seeded samples."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from llm_core import tasks as mc
from llm_core import tracking
from llm_core.checkpoint import latest_model, load_model
from llm_core.config import ScratchConfig, resolve_path
from llm_core.files import read_json, write_json
from llm_core.generate import TextGenerator
from llm_core.layout import DATASET_DIR, EVALUATION_DIR, MODEL_TOKENIZER_SUBDIR
from llm_core.loader import sequential_batches
from llm_core.model import Transformer
from llm_core.tokenized_dataset import builtin_task_path, val_bytes
from llm_core.tokenizer import load as load_tokenizer


@dataclasses.dataclass
class EvalResult:
    val_loss: float  # mean nats per validation token
    perplexity: float
    val_bpb: float  # bits per UTF-8 byte of validation text
    num_val_tokens: int
    samples: list[dict]  # {"prompt", "completion"}
    tasks: list[mc.TaskScore]  # one per evaluation.tasks file

    @property
    def core(self) -> float:
        return mc.core(self.tasks)


def bits_per_byte(mean_loss_nats: float, num_tokens: int, num_bytes: int) -> float:
    """Bits per UTF-8 byte of text from the mean loss per token: comparable across tokenizers."""
    return mean_loss_nats * num_tokens / math.log(2) / num_bytes


@torch.no_grad()
def validation_loss(model: Transformer, dataset_dir: Path, batch_size: int) -> tuple[float, int]:
    """(mean loss per token, tokens scored) over the whole validation split, every token once."""
    model.eval()
    total, count = 0.0, 0
    for x, y in sequential_batches(dataset_dir, "val", model.args.block_size, batch_size):
        _, loss = model(x, y)
        n = int((y != -100).sum())
        total += float(loss) * n
        count += n
    return total / max(count, 1), count


def evaluate(cfg: ScratchConfig, model: Transformer, tokenizer_dir: Path) -> EvalResult:
    e = cfg.evaluation
    dataset_dir = cfg.data_path / DATASET_DIR
    builtin = builtin_task_path(cfg)  # made by tokenized_dataset
    task_files = ([builtin] if builtin.is_file() else []) + [resolve_path(p) for p in e.tasks]
    task_items = {path.stem: mc.load_task(path) for path in task_files}  # bad files refused before any work
    text_bytes = val_bytes(read_json(dataset_dir / "manifest.json"))
    loss, scored = validation_loss(model, dataset_dir, cfg.training.batch_size)
    tokenizer = load_tokenizer(tokenizer_dir)
    tasks = [mc.score_task(name, items, model, tokenizer) for name, items in task_items.items()]
    generator = TextGenerator(model, tokenizer)
    samples = [{"prompt": p, "completion": generator.complete(p, max_new_tokens=e.max_new_tokens,
                                                               temperature=e.temperature, seed=e.seed)}
               for p in e.prompts]
    return EvalResult(val_loss=loss, perplexity=math.exp(loss), val_bpb=bits_per_byte(loss, scored, text_bytes),
                      num_val_tokens=scored, samples=samples, tasks=tasks)


REPORT_FILE = "report.json"


def report_path(cfg: ScratchConfig, training_key: str) -> Path:
    return cfg.data_path / EVALUATION_DIR / training_key / REPORT_FILE


@dataclasses.dataclass
class Evaluation:
    result: EvalResult
    report: Path  # model_evaluation/<training key>/report.json
    latest: dict  # the training evaluated (see checkpoint.latest_model)


def evaluate_latest(cfg: ScratchConfig, tracking_uri: str) -> Evaluation:
    """The model_evaluation stage: evaluate the latest healthy training, write its report, and log
    the scores and samples into its MLflow run."""
    latest = latest_model(cfg)
    r = evaluate(cfg, load_model(latest["path"]), Path(latest["path"]) / MODEL_TOKENIZER_SUBDIR)
    scores = {"val_loss": r.val_loss, "perplexity": r.perplexity, "val_bpb": r.val_bpb}
    report = report_path(cfg, latest["key"])
    task_metrics = {k: v for t in r.tasks for k, v in t.metrics().items()}
    if r.tasks:
        task_metrics["eval/core"] = r.core
    write_json(report, {**scores, "num_val_tokens": r.num_val_tokens, "samples": r.samples,
                        "tasks": [dataclasses.asdict(t) for t in r.tasks], "core": r.core if r.tasks else None,
                        "evaluation": cfg.evaluation.model_dump()})
    tracking.log_evaluation(latest.get("tracking_uri") or tracking_uri, latest["mlflow_run_id"], scores, r.samples,
                            task_metrics)
    return Evaluation(r, report, latest)
