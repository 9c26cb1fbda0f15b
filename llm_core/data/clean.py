"""Text cleaning: unicode normalization, PII scrubbing and Gopher/C4-style quality rules.

The rules follow Rae et al. 2021 (Gopher, appendix A) and Raffel et al. 2020 (C4), made cheap:
every statistic is one pass of a C-implemented str method, a regex or a numpy op over word hashes.
Words are whitespace-separated, as in the Gopher paper (splitting punctuation off as separate
"words" rejects most clean technical prose on the alphabetic rule; see PITFALLS).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable

import numpy as np

from llm_core.config import CleaningConfig

# C0/C1 control characters except tab and newline; zero-width and BOM characters.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
# Exotic spaces (no-break, en/em, ideographic, ...) become a plain space.
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
# Phone numbers with separators: +1 (555) 123-4567, 555-123-4567, +44 20 7946 0958, 555.123.4567
PHONE = re.compile(r"(?<![\w.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])")
PII_PATTERNS = (("email", EMAIL, "<EMAIL>"), ("ip_address", IPV4, "<IP>"), ("phone", PHONE, "<PHONE>"))

# A whitespace-separated word that contains at least one letter (any script).
_WORD_WITH_LETTER = re.compile(r"(?<!\S)\S*?[^\W\d_]")


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode normal form, no control characters, plain spaces, no trailing blanks, ≤ 1 blank line."""
    text = unicodedata.normalize(form, text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _SPACES.sub(" ", _CONTROL.sub("", text))
    text = _MANY_NEWLINES.sub("\n\n", _TRAILING_SPACE.sub("\n", text + "\n"))
    return text.strip()


def scrub_pii(text: str, counts: dict[str, int]) -> str:
    """Replace emails, IPv4 addresses and phone numbers by placeholders; add what was found to counts."""
    for name, pattern, placeholder in PII_PATTERNS:
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[name] = counts.get(name, 0) + n
    return text


def _duplicate_fraction(items: list[str]) -> float:
    items = [item.strip() for item in items if item.strip()]
    return 1.0 - len(set(items)) / len(items) if items else 0.0


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashes of the word n-grams, from per-word 64-bit hashes (wrapping uint64 arithmetic)."""
    if len(word_hashes) < n:
        return np.empty(0, dtype=np.uint64)
    out = word_hashes[: len(word_hashes) - n + 1].copy()
    for k in range(1, n):
        out = out * np.uint64(0x9E3779B97F4A7C15) + word_hashes[k: len(word_hashes) - n + 1 + k]
    return out


def _repetition(word_hashes: np.ndarray, n: int) -> tuple[float, float]:
    """(share of words covered by the most frequent n-gram, share of n-grams repeating an earlier one)."""
    grams = ngram_hashes(word_hashes, n)
    if len(grams) == 0:
        return 0.0, 0.0
    _, counts = np.unique(grams, return_counts=True)
    return counts.max() * n / len(word_hashes), 1.0 - len(counts) / len(grams)


def _mean_word_length(text: str, word_hashes: np.ndarray) -> float:
    non_space = len(text) - text.count(" ") - text.count("\n") - text.count("\t")
    return non_space / max(len(word_hashes), 1)


def _symbol_word_ratio(text: str, word_hashes: np.ndarray) -> float:
    return (text.count("#") + text.count("...") + text.count("\u2026")) / max(len(word_hashes), 1)


def _alpha_word_fraction(text: str, word_hashes: np.ndarray) -> float:
    return len(_WORD_WITH_LETTER.findall(text)) / max(len(word_hashes), 1)


# (rule = config field, statistic of (text, one hash per word), whether the rule is a lower bound)
QUALITY_RULES: tuple[tuple[str, Callable[[str, np.ndarray], float], bool], ...] = (
    ("min_chars", lambda text, words: len(text), True),
    ("max_chars", lambda text, words: len(text), False),
    ("min_words", lambda text, words: len(words), True),
    ("min_mean_word_length", _mean_word_length, True),
    ("max_mean_word_length", _mean_word_length, False),
    ("max_symbol_word_ratio", _symbol_word_ratio, False),
    ("min_alpha_word_fraction", _alpha_word_fraction, True),
    ("max_duplicate_line_fraction", lambda text, words: _duplicate_fraction(text.split("\n")), False),
    ("max_duplicate_paragraph_fraction", lambda text, words: _duplicate_fraction(text.split("\n\n")), False),
    ("max_top_2gram_fraction", lambda text, words: _repetition(words, 2)[0], False),
    ("max_duplicate_5gram_fraction", lambda text, words: _repetition(words, 5)[1], False),
)
RULE_NAMES = tuple(rule for rule, _, _ in QUALITY_RULES)


def quality_rule_failed(text: str, word_hashes: np.ndarray, cfg: CleaningConfig) -> str | None:
    """The name of the first quality rule the document fails, or None when it passes them all."""
    for rule, statistic, is_lower_bound in QUALITY_RULES:
        threshold = getattr(cfg, rule)
        if threshold is None:
            continue
        value = statistic(text, word_hashes)
        if (value < threshold) if is_lower_bound else (value > threshold):
            return rule
    return None
