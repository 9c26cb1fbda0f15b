"""The items of multiple-choice evaluation tasks: a task file read and checked, and the built-in task
made from the validation split. Scoring them is llm_core/evaluation/multiple_choice.py.

A task is a local JSONL file, one item per line:

    {"context": "The capital of France is", "choices": [" Paris", " Rome", " Oslo"], "label": 0, "id": "q1"}

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

from llm_core.files import atomic_path

BUILTIN_TASK = "continuation"
CONTEXT_WORDS, CONTINUATION_WORDS, CHOICES = 32, 8, 4


@dataclasses.dataclass
class Item:
    context: str
    choices: list[str]
    label: int
    id: str


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
