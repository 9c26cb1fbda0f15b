"""Multiple-choice downstream tasks, scored the way the field scores small base models.

A task is a local JSONL file, one item per line:

    {"context": "The capital of France is", "choices": [" Paris", " Rome", " Oslo"], "label": 0, "id": "q1"}

Each choice is scored by the log-likelihood the model gives it as a continuation of the context
(the context and the choice are tokenized separately, so the choice's tokens are its own, and the
sequence starts after <|endoftext|> as documents do). Per task:

- acc: the choice with the highest total log-likelihood is the label;
- acc_norm: the same with the log-likelihood per byte of the choice (long choices are not punished
  for being long; lm-evaluation-harness' acc_norm);
- random: the accuracy of guessing, the mean of 1 / number of choices;
- centered: (acc - random) / (1 - random), 0 for guessing and 1 for perfect, so tasks with different
  numbers of choices average fairly (nanochat's CORE convention); `core` is their mean over tasks.

Every (item, choice) pair is one row of a padded batch: a few thousand items take seconds on a CPU.

The items, the task files and the built-in `continuation` task are llm_core/data/task_items.py.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from llm_core.data.task_items import Item
from llm_core.model import Transformer
from llm_core.data.tokenizer import EOT



@dataclasses.dataclass
class TaskScore:
    name: str
    items: int
    acc: float
    acc_norm: float
    random: float
    centered: float
    per_item: list[dict] = dataclasses.field(default_factory=list, repr=False)  # id, correct, correct_norm

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "per_item"}

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: eval/<task>/acc, .../acc_norm, .../centered."""
        return {f"eval/{self.name}/{k}": getattr(self, k) for k in ("acc", "acc_norm", "centered")}


def choice_rows(items: list[Item], tokenizer: Tokenizer, block_size: int) -> list[tuple[list[int], int]]:
    """Per (item, choice): (token ids, number of choice tokens at the end). The sequence is
    <|endoftext|> + context + choice, cut from the left to block_size + 1 tokens (the choice kept)."""
    eot = tokenizer.token_to_id(EOT)
    contexts = tokenizer.encode_batch([item.context for item in items])
    choices = tokenizer.encode_batch([c for item in items for c in item.choices])
    rows, k = [], 0
    for item, context in zip(items, contexts):
        for _ in item.choices:
            choice = choices[k].ids[:block_size]
            k += 1
            ids = ([eot] + context.ids + choice)[-(block_size + 1):]
            rows.append((ids, len(choice)))
    return rows


@torch.no_grad()
def choice_log_likelihoods(model: Transformer, rows: list[tuple[list[int], int]], batch_size: int = 64,
                           pad_id: int = 0) -> list[float]:
    """The summed log-probability of each row's last n tokens given the tokens before them."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch) - 1
        x = torch.full((len(batch), width), pad_id, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)  # -100: not scored
        for i, (ids, n) in enumerate(batch):  # left-aligned: padding after a row cannot change it (causal)
            x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[i, len(ids) - 1 - n:len(ids) - 1] = torch.tensor(ids[-n:])
        logits, _ = model(x)  # (B, T, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
        out += (picked * (y != -100)).sum(dim=1).tolist()
    return out


def score_task(name: str, items: list[Item], model: Transformer, tokenizer: Tokenizer,
               batch_size: int = 64) -> TaskScore:
    rows = choice_rows(items, tokenizer, model.args.block_size)
    pad = tokenizer.token_to_id(EOT)
    likelihoods = iter(choice_log_likelihoods(model, rows, batch_size, pad))
    per_item = []
    for item in items:
        ll = [next(likelihoods) for _ in item.choices]
        per_byte = [v / len(c.encode()) for v, c in zip(ll, item.choices)]
        per_item.append({"id": item.id, "correct": max(range(len(ll)), key=ll.__getitem__) == item.label,
                         "correct_norm": max(range(len(ll)), key=per_byte.__getitem__) == item.label})
    random = sum(1 / len(item.choices) for item in items) / len(items)
    acc = sum(r["correct"] for r in per_item) / len(items)
    acc_norm = sum(r["correct_norm"] for r in per_item) / len(items)
    return TaskScore(name, len(items), acc, acc_norm, random, (acc - random) / (1 - random), per_item)


def core(scores: list[TaskScore]) -> float:
    """The mean centered accuracy over tasks."""
    return sum(s.centered for s in scores) / len(scores) if scores else float("nan")


