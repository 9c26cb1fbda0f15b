"""Decontamination: no evaluation item's text may be in the training split.

An item's text is its context followed by its correct choice. Both sides are compared as word
n-grams (`dataset.decontamination_ngram`, 13 by default as in GPT-3's and lm-evaluation-harness'
checks): lower-cased runs of letters and digits, so punctuation and spacing do not hide a copy.
A training document that shares any n-gram with any item is contaminated. Items shorter than n
words cannot be checked and are counted as such.

Bounded memory on any corpus: only the evaluation side is held, as a sorted array of 64-bit hashes;
training documents stream past it, one shard per data-engine task (`tokenized_dataset.encode_shard`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import xxhash

from llm_core.data import task_items
from llm_core.files import short_hash

WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial hash keeps every bit of each word


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """A uint64 hash per word n-gram of the text (none when it has fewer than n words)."""
    w = np.fromiter((xxhash.xxh3_64_intdigest(word.encode()) for word in words(text)), dtype=np.uint64)
    if len(w) < n:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(len(w) - n + 1, dtype=np.uint64)
    for k in range(n):  # h = sum of w[i + k] * M^(n-1-k), modulo 2^64 (numpy wraps)
        h = h * _MULTIPLIER + w[k:len(w) - n + 1 + k]
    return h


@dataclasses.dataclass
class EvalNgrams:
    """The n-grams of every evaluation item, and which item each came from."""

    n: int
    hashes: np.ndarray  # sorted, unique uint64
    owners: list[str]  # "<task>:<item id>" for each hash
    items_checked: int
    items_too_short: int  # fewer than n words: nothing to compare

    @property
    def fingerprint(self) -> str:
        """Changes when the n-grams change: tokenized_dataset re-checks every shard then."""
        return short_hash([self.n, xxhash.xxh3_64_hexdigest(self.hashes.tobytes())])

    def match(self, text: str) -> str | None:
        """The item a text shares an n-gram with, or None."""
        if not len(self.hashes):
            return None
        h = ngram_hashes(text, self.n)
        pos = np.searchsorted(self.hashes, h).clip(max=len(self.hashes) - 1)
        hit = np.flatnonzero(self.hashes[pos] == h)
        return self.owners[int(pos[hit[0]])] if len(hit) else None


def eval_ngrams(task_files: dict[str, Path], n: int) -> EvalNgrams:
    """The n-grams of the items of every task file (name -> path); bad files are refused by load_task."""
    owner_of: dict[int, str] = {}
    checked = too_short = 0
    for name, path in task_files.items():
        for item in task_items.load_task(path):
            h = ngram_hashes(f"{item.context} {item.choices[item.label]}", n)
            checked += 1
            too_short += not len(h)
            for value in h.tolist():
                owner_of.setdefault(value, f"{name}:{item.id}")
    hashes = np.array(sorted(owner_of), dtype=np.uint64)
    return EvalNgrams(n, hashes, [owner_of[int(v)] for v in hashes], checked, too_short)
