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

The built-in task, `continuation`, needs no download and exists for every corpus: `tokenized_dataset`
makes it from the validation split (`build_continuation_task`): a passage of a validation document,
its true next words, and three spans of the same length from other validation documents. Seeded and
deterministic, and no training text is in it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from llm_core.files import atomic_path
from llm_core.model import Transformer
from llm_core.tokenizer import EOT

BUILTIN_TASK = "continuation"
CONTEXT_WORDS, CONTINUATION_WORDS, CHOICES = 32, 8, 4


@dataclasses.dataclass
class Item:
    context: str
    choices: list[str]
    label: int
    id: str


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


def load_task(path: str | Path) -> list[Item]:
    """The items of a task file, or an error naming the file and line of the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation.tasks: no task file {path}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: not a JSON object")
        context, choices, label = raw.get("context"), raw.get("choices"), raw.get("label")
        if not isinstance(context, str) or not context:
            raise ValueError(f"{where}: 'context' must be a non-empty string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise ValueError(f"{where}: 'label' must be an integer from 0 to {len(choices) - 1}, not {label!r}")
        items.append(Item(context, choices, label, str(raw.get("id", number))))
    if not items:
        raise ValueError(f"evaluation.tasks: {path} has no items")
    return items


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


def build_continuation_task(val_texts: Iterable[str], path: Path, num_items: int, seed: int) -> int:
    """Write the built-in task from validation documents: per item, CONTEXT_WORDS words of a document,
    and as choices its next CONTINUATION_WORDS words plus spans of as many words from CHOICES - 1
    other documents, in a seeded random order. Returns the number of items (0: too few documents)."""
    documents = [words for words in (text.split() for text in val_texts)
                 if len(words) >= CONTEXT_WORDS + CONTINUATION_WORDS]
    if len(documents) < CHOICES:
        path.unlink(missing_ok=True)
        return 0
    rng = random.Random(seed)
    items = []
    for n in range(num_items):
        doc = rng.randrange(len(documents))
        others = _sample_others(rng, len(documents), doc)
        words = documents[doc]
        start = rng.randrange(len(words) - CONTEXT_WORDS - CONTINUATION_WORDS + 1)
        context = " ".join(words[start:start + CONTEXT_WORDS])
        spans = [words[start + CONTEXT_WORDS:start + CONTEXT_WORDS + CONTINUATION_WORDS]]
        for other in others:
            o = documents[other]
            at = rng.randrange(len(o) - CONTINUATION_WORDS + 1)
            spans.append(o[at:at + CONTINUATION_WORDS])
        order = list(range(CHOICES))
        rng.shuffle(order)
        items.append({"context": context, "choices": [" " + " ".join(spans[i]) for i in order],
                      "label": order.index(0), "id": f"{BUILTIN_TASK}-{n}"})
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    return len(items)


def _sample_others(rng: random.Random, n: int, exclude: int) -> list[int]:
    """CHOICES - 1 distinct document indices other than `exclude`, without listing all n."""
    picked: list[int] = []
    while len(picked) < CHOICES - 1:
        i = rng.randrange(n)
        if i != exclude and i not in picked:
            picked.append(i)
    return picked
