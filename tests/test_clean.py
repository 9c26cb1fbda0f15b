"""llm_core.data.clean: normalization, PII scrubbing and the quality rules, one crafted doc per rule."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llm_core.config import CleaningConfig
from llm_core.data import clean, dedup


def failed_rule(text: str, cfg: CleaningConfig | None = None) -> str | None:
    return clean.quality_rule_failed(text, dedup.word_hashes(dedup.split_words(text)), cfg or CleaningConfig())


def pseudo_words(n: int, lengths=(4, 8), seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(*lengths))) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# normalize


def test_nfc_composes_combining_accents():
    assert clean.normalize("cafe\u0301") == "caf\u00e9"
    assert clean.normalize("caf\u00e9", "NFD") == "cafe\u0301"
    assert clean.normalize("\ufb01ne", "NFKC") == "fine"  # the fi ligature


def test_control_and_zero_width_characters_are_removed():
    assert clean.normalize("a\x00b\x07c\x1bd\x7fe\x85f\u200bg\ufeffh") == "abcdefgh"
    assert clean.normalize("tab\tand\nnewline") == "tab\tand\nnewline"  # tab and newline survive


def test_newlines_and_spaces():
    assert clean.normalize("a\r\nb\rc") == "a\nb\nc"
    assert clean.normalize("line one   \nline two\t\t\nend  ") == "line one\nline two\nend"
    assert clean.normalize("a\n\n\nb\n\n\n\n\nc\n\nd") == "a\n\nb\n\nc\n\nd"
    assert clean.normalize("a  \n \n  \nb") == "a\n\nb"  # blank lines with spaces are blank lines
    assert clean.normalize("no\u00a0break\u2003em\u3000wide") == "no break em wide"
    assert clean.normalize("\n\n  padded text \n\n") == "padded text"


def test_normalize_is_idempotent(prose):
    messy = "  " + prose[0].replace(". ", ".\r\n\r\n\r\n") + " \x00\u200b "
    once = clean.normalize(messy)
    assert clean.normalize(once) == once and "\r" not in once and "\n\n\n" not in once


# ----------------------------------------------------------------------------------------------
# PII


def scrub(text: str) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    return clean.scrub_pii(text, counts), counts


@pytest.mark.parametrize("email", ["jane@example.com", "john.doe+tag@mail.example.co.uk", "A_B-c%1@sub-domain.org"])
def test_emails_are_replaced(email):
    assert scrub(f"Write to {email} today.") == ("Write to <EMAIL> today.", {"email": 1})


@pytest.mark.parametrize("ip", ["192.168.1.1", "10.0.0.255", "8.8.8.8", "255.255.255.255", "0.0.0.0"])
def test_ipv4_addresses_are_replaced(ip):
    assert scrub(f"Server {ip} is down.") == ("Server <IP> is down.", {"ip_address": 1})


@pytest.mark.parametrize("text", ["999.1.1.1", "1.2.3.256", "192.168.1.1000", "1.2.3", "version 3.12.1"])
def test_non_ip_dotted_numbers_are_kept(text):
    assert scrub(f"See {text} here.") == (f"See {text} here.", {})


@pytest.mark.parametrize("phone", ["+1 (555) 123-4567", "555-123-4567", "(555) 123-4567", "555.123.4567",
                                   "+44 20 7946 0958", "+1-555-123-4567"])
def test_phone_numbers_are_replaced(phone):
    assert scrub(f"Call {phone} now.") == ("Call <PHONE> now.", {"phone": 1})


@pytest.mark.parametrize("text", [
    "In 2024 the count was 12345.",
    "Founded in 1999, it had 100000 users by 2010.",
    "The range 2020-2024 and 10-20 items.",
    "Pi is 3.14159 and e is 2.71828.",
    "Order #12345678 shipped.",
    "On 2024-01-15 at 12:30:45.",
])
def test_years_and_plain_numbers_are_kept(text):
    assert scrub(text) == (text, {})


def test_pii_counts_accumulate():
    counts: dict[str, int] = {}
    clean.scrub_pii("a@b.io and c@d.io from 1.2.3.4", counts)
    text = clean.scrub_pii("call 555-123-4567 or mail e@f.io", counts)
    assert text == "call <PHONE> or mail <EMAIL>"
    assert counts == {"email": 3, "ip_address": 1, "phone": 1}


# ----------------------------------------------------------------------------------------------
# quality rules


def test_clean_prose_passes_every_rule(prose):
    for text in prose[:20]:
        assert failed_rule(clean.normalize(text)) is None


def test_multi_paragraph_prose_passes(prose):
    assert failed_rule("\n\n".join(prose[:5])) is None


def crafted_docs(prose: list[str]) -> dict[str, tuple[str, CleaningConfig]]:
    """rule -> (a document that passes every earlier rule and fails this one, config)."""
    base = CleaningConfig()
    p = next(t for t in prose if 600 < len(t) < 1500)
    words = p.split()
    long_words = pseudo_words(40, (11, 16), seed=1)
    numbers = [str(1000 + 37 * i) for i in range(60)]
    seq = pseudo_words(70, seed=2)
    lines = [s.strip() + "." for s in p.split(". ") if len(s.split()) > 3]
    return {
        "min_chars": ("A short note with a few words only.", base),
        "max_chars": (p, base.model_copy(update={"max_chars": 500})),
        "min_words": (" ".join(pseudo_words(25, (8, 9), seed=3)), base),
        "min_mean_word_length": (" ".join(pseudo_words(120, (1, 3), seed=4)), base),
        "max_mean_word_length": (" ".join(long_words), base),
        "max_symbol_word_ratio": (" ".join(w + (" #tag" if i % 4 == 0 else "") for i, w in enumerate(words)), base),
        "min_alpha_word_fraction": (" ".join(x for pair in zip(words, numbers) for x in pair), base),
        "max_duplicate_line_fraction": ("\n".join(lines + ["Subscribe to our newsletter for updates."] * 8), base),
        "max_duplicate_paragraph_fraction": (
            "\n\n".join(["\n".join(lines[i:i + 2]) for i in range(0, 8, 2)] + ["Read more."] * 4), base),
        "max_top_2gram_fraction": (" ".join(f"{w} big cat" for w in pseudo_words(40, seed=5)), base),
        "max_duplicate_5gram_fraction": (" ".join(seq + seq[:30]), base),
    }


def test_there_is_one_crafted_doc_per_rule(prose):
    assert set(crafted_docs(prose)) == set(clean.RULE_NAMES)


@pytest.mark.parametrize("rule", clean.RULE_NAMES)
def test_each_rule_triggers_on_a_crafted_doc(prose, rule):
    text, cfg = crafted_docs(prose)[rule]
    assert failed_rule(text, cfg) == rule
    off = cfg.model_copy(update={rule: None})  # a rule set to null is off
    assert failed_rule(text, off) != rule


def test_all_rules_off_passes_anything():
    off = CleaningConfig(**{rule: None for rule in clean.RULE_NAMES})
    assert failed_rule("#", off) is None and failed_rule("", off) is None


def test_rule_statistics_are_exact():
    text = "alpha beta\ngamma 123\nalpha beta\n\n# ..."
    hashes = dedup.word_hashes(dedup.split_words(text))
    assert len(hashes) == 8
    assert clean._symbol_word_ratio(text, hashes) == pytest.approx(2 / 8)
    assert clean._alpha_word_fraction(text, hashes) == pytest.approx(5 / 8)
    assert clean._duplicate_fraction(text.split("\n")) == pytest.approx(1 / 4)
    assert clean._mean_word_length(text, hashes) == pytest.approx(len(text.replace(" ", "").replace("\n", "")) / 8)


def test_ngram_hashes_identify_equal_ngrams():
    hashes = dedup.word_hashes(dedup.split_words("a b c a b c a b"))
    grams = clean.ngram_hashes(hashes, 3)
    assert len(grams) == 6 and grams[0] == grams[3] and len(np.unique(grams)) == 3
    assert len(clean.ngram_hashes(hashes[:2], 3)) == 0
    top, dup = clean._repetition(hashes, 2)
    assert top == pytest.approx(3 * 2 / 8) and dup == pytest.approx(1 - 3 / 7)
