"""llm_core.data.dedup: exact Jaccard, MinHash estimates, the LSH near-duplicate index, content hashes.

Near-duplicate pairs are built with a KNOWN word-5-gram Jaccard: a base text of random pseudo-words
(all 5-grams distinct) and a copy with `m` words replaced at positions >= 5 apart, so each change
removes 5 shingles and adds 5: J = (S - 5m) / (S + 5m). The test computes the exact value anyway.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from llm_core.config import DedupConfig, load_config
from llm_core.data import dedup

N_WORDS = 200


def shingles_of_text(text: str, n: int = 5) -> np.ndarray:
    return dedup.shingle_set(dedup.word_hashes(dedup.split_words(text)), n)


def exact_jaccard(a: str, b: str, n: int = 5) -> float:
    """Word n-gram Jaccard computed independently of the module, on Python tuples."""
    wa, wb = a.lower().split(), b.lower().split()
    sa = {tuple(wa[i:i + n]) for i in range(len(wa) - n + 1)}
    sb = {tuple(wb[i:i + n]) for i in range(len(wb) - n + 1)}
    return len(sa & sb) / len(sa | sb)


class Words:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def word(self) -> str:
        return "".join(self.rng.choices("abcdefghijklmnopqrstuvwxyz", k=self.rng.randint(4, 9)))

    def text(self, n: int = N_WORDS) -> list[str]:
        return [self.word() for _ in range(n)]

    def variant(self, base: list[str], changes: int) -> list[str]:
        """`changes` words replaced, 6 apart and >= 4 words from either end (each hits 5 shingles)."""
        out = list(base)
        for slot in self.rng.sample(range(len(base) // 6 - 1), changes):
            out[slot * 6 + 5] = self.word()
        return out


def pairs(seed: int, changes: int, count: int) -> list[tuple[str, str, float]]:
    w = Words(seed)
    out = []
    for _ in range(count):
        base = w.text()
        a, b = " ".join(base), " ".join(w.variant(base, changes))
        out.append((a, b, exact_jaccard(a, b)))
    return out


class Corpus:
    """Runs documents through a NearDupIndex as build_cleaned_shards does."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.hasher = dedup.MinHasher(cfg.num_permutations, cfg.seed)
        self.shingles: list[np.ndarray] = []
        self.index = dedup.NearDupIndex(cfg, lambda ref: self.shingles[ref])

    def offer(self, text: str) -> int | None:
        sh = shingles_of_text(text, self.cfg.shingle_words)
        self.shingles.append(sh)
        return self.index.find_or_add(len(self.shingles) - 1, self.hasher.signature(sh), sh)


# ----------------------------------------------------------------------------------------------


def test_jaccard_is_exact():
    a = np.arange(1, 11, dtype=np.uint64)
    b = np.arange(6, 16, dtype=np.uint64)
    assert dedup.jaccard(a, b) == pytest.approx(5 / 15)
    assert dedup.jaccard(a, a) == 1.0
    assert dedup.jaccard(a, np.arange(20, 25, dtype=np.uint64)) == 0.0
    assert dedup.jaccard(np.empty(0, np.uint64), np.empty(0, np.uint64)) == 1.0
    assert dedup.jaccard(a, np.empty(0, np.uint64)) == 0.0


def test_shingle_jaccard_matches_the_exact_word_5gram_jaccard():
    shingles = N_WORDS - 4
    for changes in (1, 4, 15):
        for a, b, j in pairs(seed=changes, changes=changes, count=5):
            assert j == pytest.approx((shingles - 5 * changes) / (shingles + 5 * changes))
            assert dedup.jaccard(shingles_of_text(a), shingles_of_text(b)) == pytest.approx(j)


def test_shingles_ignore_case_and_whitespace():
    a = shingles_of_text("The quick brown fox jumps over the lazy dog")
    b = shingles_of_text("the  QUICK brown\nfox jumps over\tthe lazy   dog")
    assert np.array_equal(a, b) and len(a) == 5


def test_short_document_is_one_shingle():
    assert len(shingles_of_text("only three words")) == 1
    assert len(shingles_of_text("")) == 0


@pytest.mark.parametrize("changes", [2, 6, 12, 25])
def test_minhash_estimate_is_close_to_the_true_jaccard(changes):
    # 256 permutations: the standard error is <= 0.031, so 0.1 is > 3 sigma for every pair
    hasher = dedup.MinHasher(256, 1234)
    errors = []
    for a, b, j in pairs(seed=10 + changes, changes=changes, count=10):
        sa, sb = shingles_of_text(a), shingles_of_text(b)
        estimate = float(np.mean(hasher.signature(sa) == hasher.signature(sb)))
        assert abs(estimate - j) < 0.1, (estimate, j)
        errors.append(estimate - j)
    assert abs(np.mean(errors)) < 0.03  # unbiased


def test_minhash_estimate_with_the_default_permutations():
    cfg = load_config().dedup
    hasher = dedup.MinHasher(cfg.num_permutations, cfg.seed)
    errors = []
    for changes in (2, 6, 12, 25):
        for a, b, j in pairs(seed=60 + changes, changes=changes, count=10):
            sa, sb = shingles_of_text(a), shingles_of_text(b)
            errors.append(float(np.mean(hasher.signature(sa) == hasher.signature(sb))) - j)
    errors = np.abs(errors)
    assert errors.max() < 0.15 and np.mean(errors < 0.1) >= 0.9 and errors.mean() < 0.05


def test_minhash_signature_is_deterministic_and_order_free():
    sh = shingles_of_text(" ".join(Words(3).text()))
    h1, h2 = dedup.MinHasher(64, 7), dedup.MinHasher(64, 7)
    assert np.array_equal(h1.signature(sh), h2.signature(sh[::-1]))
    assert not np.array_equal(h1.signature(sh), dedup.MinHasher(64, 8).signature(sh))
    big = np.arange(10_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # spans several hashing chunks
    assert np.array_equal(h1.signature(big), np.minimum(h1.signature(big[:5000]), h1.signature(big[5000:])))


def test_near_duplicates_above_the_threshold_are_found():
    cfg = load_config().dedup
    corpus = Corpus(cfg)
    found = []
    for changes in (1, 2, 3):  # J ~ 0.95, 0.90, 0.86
        for a, b, j in pairs(seed=20 + changes, changes=changes, count=15):
            assert cfg.threshold <= j <= 0.96
            ref = len(corpus.shingles)
            assert corpus.offer(a) is None
            found.append(corpus.offer(b) == ref)
    assert all(found), f"{found.count(False)} of {len(found)} near duplicates missed"


def test_near_duplicate_recall_at_the_threshold_is_at_least_99_percent():
    # DESIGN: recall >= 99% on pairs with word 5-gram Jaccard >= 0.8. LSH with b bands of r rows makes a
    # pair a candidate with probability 1 - (1 - J^r)^b: 95% at J=0.8 for 16x8, > 99.99% for 32x4.
    cfg = load_config().dedup
    corpus = Corpus(cfg)
    found = []
    for a, b, j in pairs(seed=30, changes=4, count=300):  # J = (196-20) / (196+20) = 0.815
        assert cfg.threshold <= j < 0.82
        ref = len(corpus.shingles)
        corpus.offer(a)
        found.append(corpus.offer(b) == ref)
    assert sum(found) / len(found) >= 0.99, f"recall {sum(found) / len(found):.3f}"


def test_pairs_below_the_threshold_and_distinct_texts_are_kept():
    cfg = load_config().dedup
    corpus = Corpus(cfg)
    below = pairs(seed=40, changes=12, count=30)  # J = 136/256 ~ 0.53
    for a, b, j in below:
        assert 0.45 < j < 0.6
        assert corpus.offer(a) is None
        assert corpus.offer(b) is None
    distinct = Words(41)
    for _ in range(100):
        assert corpus.offer(" ".join(distinct.text())) is None
    # slightly below the threshold: the exact confirmation refuses what MinHash may suggest
    for a, b, j in pairs(seed=42, changes=5, count=30):  # J = 171/221 ~ 0.77
        assert j < cfg.threshold
        assert corpus.offer(a) is None
        assert corpus.offer(b) is None


def test_index_keeps_the_first_of_a_group():
    corpus = Corpus(DedupConfig())
    w = Words(50)
    base = w.text()
    first = corpus.offer(" ".join(base))
    assert first is None
    assert corpus.offer(" ".join(w.variant(base, 1))) == 0
    assert corpus.offer(" ".join(w.variant(base, 2))) == 0  # duplicates are not indexed: still points at 0
    assert len(corpus.index.signatures) == 1
    assert corpus.offer(" ".join(base).upper()) == 0


def test_content_hash_detects_exact_duplicates_modulo_case_and_whitespace(prose):
    text = prose[0]
    variant = "  " + text.upper().replace(" ", "  \n") + "\n"
    h = dedup.content_hash(dedup.split_words(text))
    assert dedup.content_hash(dedup.split_words(variant)) == h
    assert dedup.content_hash(dedup.split_words(text + " extra")) != h
    assert dedup.content_hash(dedup.split_words(prose[1])) != h
    assert len({dedup.content_hash(dedup.split_words(p)) for p in prose}) == len(prose)


@pytest.mark.parametrize("cuts", [[], [37], [5, 6, 120], [1, 2, 3, 150, 151], [1, 3]])
def test_document_sketch_of_pieces_equals_that_of_the_whole_document(prose, cuts):
    """Fed a document piece by piece (cut between words), the sketch has the hash, signature and shingle
    set of the whole text: the shingles that span a cut count."""
    cfg = load_config().dedup
    hasher = dedup.MinHasher(cfg.num_permutations, cfg.seed)
    words = " ".join(prose[:3]).split()[:4 if cuts == [1, 3] else None]  # the last: shorter than a shingle
    pieces = [" ".join(words[a:b]) for a, b in zip([0, *cuts], [*cuts, len(words)])]
    sketch = dedup.DocumentSketch(hasher, cfg.shingle_words)
    for piece in pieces:
        piece_words = dedup.split_words(piece)
        sketch.add(piece_words, dedup.word_hashes(piece_words))
    whole = dedup.split_words(" ".join(pieces))
    shingles = dedup.shingle_set(dedup.word_hashes(whole), cfg.shingle_words)
    content_hash, signature, high_halves = sketch.finish()
    assert content_hash == dedup.content_hash(whole)
    assert np.array_equal(signature, hasher.signature(shingles))
    assert np.array_equal(high_halves, np.unique((shingles >> np.uint64(32)).astype(np.uint32)))
