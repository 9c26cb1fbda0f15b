"""Text cleaning: unicode normalization, PII scrubbing and Gopher/C4-style quality rules.

The rules follow Rae et al. 2021 (Gopher, appendix A) and Raffel et al. 2020 (C4), made cheap:
every statistic is one pass of a C-implemented str method, a regex or a numpy op over word hashes.
Words are whitespace-separated, as in the Gopher paper (splitting punctuation off as separate
"words" rejects most clean technical prose on the alphabetic rule: measured, 14% kept vs 84%).
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
PHONE = re.compile(r"(?<![\w.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{4}(?![\w-])")
PII_PATTERNS = (("email", EMAIL, "<EMAIL>"), ("ip_address", IPV4, "<IP>"), ("phone", PHONE, "<PHONE>"))

# A whitespace-separated word that contains at least one letter (any script).
_WORD_WITH_LETTER = re.compile(r"(?<!\S)\S*?[^\W\d_]")

# Fast paths. A regex scan visits every character (~50-150 MB/s); bytes.translate and `in` run at
# GB/s. So the regexes run only when a cheap test says they could match, and ASCII text (most of
# it) skips the patterns that only match non-ASCII characters. Results are identical either way.
_ASCII_CONTROL = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])  # _CONTROL ∩ ASCII
# For counting words with a letter (see _count_words_with_letter).
_ASCII = bytes(range(128))
_ASCII_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LETTER_CLASSES = bytes.maketrans(_ASCII_SPACE + _LETTERS, b" " * len(_ASCII_SPACE) + b"a" * len(_LETTERS))
_NOT_LETTER_OR_SPACE = bytes(c for c in range(256) if c not in _LETTERS + _ASCII_SPACE)
# For the PII patterns, each UTF-8 byte becomes its class: an ASCII digit or any non-ASCII byte -> "d"
# (a non-ASCII `\d` digit is 2-4 such bytes), "." -> "p", " " and "-" -> "s", anything else -> "x".
_PII_CLASSES = bytes(ord("d") if chr(c).isdigit() or c >= 0x80 else ord("p") if c == ord(".") else
                     ord("s") if c in b" -" else ord("x") for c in range(256))
_IPV4_CLASSES = re.compile(rb"dpd+pd+pd")  # what an IPv4 address (4 runs of digits joined by ".") becomes


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode normal form, no control characters, plain spaces, no trailing blanks, ≤ 1 blank line."""
    text = unicodedata.normalize(form, text.replace("\r\n", "\n").replace("\r", "\n"))
    if not text.isascii():
        # Every character of _CONTROL and _SPACES is non-printable (Unicode "Other" or "Separator").
        if not text.replace("\n", "").replace("\t", "").isprintable():
            text = _SPACES.sub(" ", _CONTROL.sub("", text))
    elif len(raw := text.encode("ascii")) != len(raw.translate(None, _ASCII_CONTROL)):
        text = _CONTROL.sub("", text)  # ASCII text has no exotic spaces, but may have control characters
    text += "\n"
    if " \n" in text or "\t\n" in text:  # every match of _TRAILING_SPACE ends with one of these
        text = _TRAILING_SPACE.sub("\n", text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def scrub_pii(text: str, counts: dict[str, int]) -> str:
    """Replace emails, IPv4 addresses and phone numbers by placeholders; add what was found to counts."""
    possible = _possible_pii(text)
    for name, pattern, placeholder in PII_PATTERNS:
        if name not in possible:
            continue
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[name] = counts.get(name, 0) + n
    return text


def _possible_pii(text: str) -> set[str]:
    """The PII patterns that could match `text`, by a necessary condition that is cheap to test.

    An email contains "@"; an IPv4 address four dot-separated runs of digits; a phone number ends with
    `\\d{3,4}[ .-]\\d{4}`, so contains digit ×3, one of " .-", digit ×3. (Keep these in step with the
    patterns.) Placeholders contain no digit, "@" or separator, so scrubbing one pattern cannot
    create a match of the next one that this test on the original text would not have seen."""
    possible = {"email"} if "@" in text else set()
    classes = text.encode("utf-8", "surrogatepass").translate(_PII_CLASSES)
    if _IPV4_CLASSES.search(classes):
        possible.add("ip_address")
    if b"dddsddd" in classes or b"dddpddd" in classes:
        possible.add("phone")
    return possible


def _duplicate_fraction(items: list[str]) -> float:
    items = [item.strip() for item in items if item.strip()]
    return 1.0 - len(set(items)) / len(items) if items else 0.0


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashes of the word n-grams, from per-word 64-bit hashes (wrapping uint64 arithmetic)."""
    if len(word_hashes) < n:
        return np.empty(0, dtype=np.uint64)
    out = word_hashes[: len(word_hashes) - n + 1].copy()
    for k in range(1, n):  # in place: no temporary arrays
        out *= np.uint64(0x9E3779B97F4A7C15)
        out += word_hashes[k: len(word_hashes) - n + 1 + k]
    return out


def _repetition(word_hashes: np.ndarray, n: int) -> tuple[float, float]:
    """(share of words covered by the most frequent n-gram, share of n-grams repeating an earlier one)."""
    grams = ngram_hashes(word_hashes, n)
    if len(grams) == 0:
        return 0.0, 0.0
    # np.unique(grams, return_counts=True) by hand: for these small arrays its overhead dominates.
    grams.sort()
    new = grams[1:] != grams[:-1]
    if new.all():  # no n-gram repeats (the common case for 5-grams): every count is 1
        return n / len(word_hashes), 0.0
    counts = np.diff(np.flatnonzero(np.concatenate(([True], new, [True]))))
    return counts.max() * n / len(word_hashes), 1.0 - len(counts) / len(grams)


def _mean_word_length(text: str, word_hashes: np.ndarray) -> float:
    non_space = len(text) - text.count(" ") - text.count("\n") - text.count("\t")
    return non_space / max(len(word_hashes), 1)


def _symbol_word_ratio(text: str, word_hashes: np.ndarray) -> float:
    return (text.count("#") + text.count("...") + text.count("\u2026")) / max(len(word_hashes), 1)


def _count_words_with_letter(text: str) -> int:
    """len(_WORD_WITH_LETTER.findall(text)), at bytes speed: whitespace becomes " ", letters "a", and
    every other character is deleted; then each word with a letter leaves one " a" (after a leading
    " ") and no other word leaves any."""
    if not text.isascii():
        # The distinct non-ASCII characters: usually a few (quotes, dashes, accented letters).
        others = set(text.encode("utf-8", "surrogatepass").translate(None, _ASCII).decode("utf-8", "surrogatepass"))
        letters = [c for c in others if c.isalnum() and not c.isdecimal()]  # what [^\W\d_] matches
        if len(letters) > 8 or any(c.isspace() for c in others):  # another script, or Unicode spaces
            return len(_WORD_WITH_LETTER.findall(text))
        for letter in letters:
            text = text.replace(letter, "a")
    classes = (b" " + text.encode("utf-8", "surrogatepass")).translate(_LETTER_CLASSES, _NOT_LETTER_OR_SPACE)
    return classes.count(b" a")


def _alpha_word_fraction(text: str, word_hashes: np.ndarray) -> float:
    return _count_words_with_letter(text) / max(len(word_hashes), 1)


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


def quality_rule_failed(text: str, word_hashes: np.ndarray, cfg: CleaningConfig,
                        later_piece: bool = False) -> str | None:
    """The name of the first quality rule the piece fails, or None when it passes them all.

    The rules judge each piece of a long document on its own (a page of junk does not cost the whole
    book). But a `later_piece` (not the first of its source document) shorter than min_chars or
    min_words, typically the short end of a long document, is not a short document, and too short for
    the other statistics to mean anything: it is kept unjudged."""
    if later_piece and ((cfg.min_chars is not None and len(text) < cfg.min_chars)
                        or (cfg.min_words is not None and len(word_hashes) < cfg.min_words)):
        return None
    values: dict = {}  # a statistic shared by two rules (min and max mean word length) is computed once
    for rule, statistic, is_lower_bound in QUALITY_RULES:
        threshold = getattr(cfg, rule)
        if threshold is None:
            continue
        if statistic not in values:
            values[statistic] = statistic(text, word_hashes)
        value = values[statistic]
        if (value < threshold) if is_lower_bound else (value > threshold):
            return rule
    return None
