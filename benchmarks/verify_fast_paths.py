"""Check that the fast paths in llm_core.data.clean / dedup give exactly the results of the plain
implementations they replaced (kept below as the reference), on real documents and on fuzzed text
full of the edge cases: control characters, exotic spaces, non-ASCII digits and letters, emails,
IP addresses, phone numbers, trailing blanks, runs of newlines.

    python benchmarks/verify_fast_paths.py [RAW_PARQUET_OR_TEXT_DIR ...] [--fuzz 20000]
"""

from __future__ import annotations

import argparse
import random
import sys
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import benchmarks.* from the root

import numpy as np
import pyarrow.parquet as pq


from llm_core.config import CleaningConfig  # noqa: E402
from llm_core.data import clean, dedup  # noqa: E402

# ---- reference implementations (the code before the fast paths) ----------------------------


def ref_normalize(text: str, form: str = "NFC") -> str:
    text = unicodedata.normalize(form, text.replace("\r\n", "\n").replace("\r", "\n"))
    text = clean._SPACES.sub(" ", clean._CONTROL.sub("", text))
    text = clean._MANY_NEWLINES.sub("\n\n", clean._TRAILING_SPACE.sub("\n", text + "\n"))
    return text.strip()


def ref_scrub_pii(text: str, counts: dict[str, int]) -> str:
    for name, pattern, placeholder in clean.PII_PATTERNS:
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[name] = counts.get(name, 0) + n
    return text


def ref_alpha_words(text: str) -> int:
    return len(clean._WORD_WITH_LETTER.findall(text))


def ref_quality_rule_failed(text: str, word_hashes: np.ndarray, cfg: CleaningConfig) -> str | None:
    stats = {"min_alpha_word_fraction": lambda t, w: ref_alpha_words(t) / max(len(w), 1),
             "max_top_2gram_fraction": lambda t, w: ref_repetition(w, 2)[0],
             "max_duplicate_5gram_fraction": lambda t, w: ref_repetition(w, 5)[1]}
    for rule, statistic, is_lower_bound in clean.QUALITY_RULES:
        threshold = getattr(cfg, rule)
        if threshold is None:
            continue
        value = stats.get(rule, statistic)(text, word_hashes)
        if (value < threshold) if is_lower_bound else (value > threshold):
            return rule
    return None


def ref_repetition(word_hashes: np.ndarray, n: int) -> tuple[float, float]:
    grams = clean.ngram_hashes(word_hashes, n)
    if len(grams) == 0:
        return 0.0, 0.0
    _, counts = np.unique(grams, return_counts=True)
    return counts.max() * n / len(word_hashes), 1.0 - len(counts) / len(grams)


def ref_ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    if len(word_hashes) < n:
        return np.empty(0, dtype=np.uint64)
    out = word_hashes[: len(word_hashes) - n + 1].copy()
    for k in range(1, n):
        out = out * np.uint64(0x9E3779B97F4A7C15) + word_hashes[k: len(word_hashes) - n + 1 + k]
    return out


def ref_split_words(text: str) -> list[bytes]:
    return text.lower().encode("utf-8").split()


def ref_shingle_set(hashes: np.ndarray, shingle_words: int) -> np.ndarray:
    if len(hashes) == 0:
        return np.empty(0, dtype=np.uint64)
    return np.unique(ref_ngram_hashes(hashes, min(shingle_words, len(hashes))))


def ref_signature(hasher: dedup.MinHasher, shingles: np.ndarray) -> np.ndarray:
    sig = np.full(len(hasher.a), np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(shingles), 4096):
        chunk = shingles[start: start + 4096, None]
        np.minimum(sig, (chunk * hasher.a + hasher.b).min(axis=0), out=sig)
    return sig


# ---- fuzzed text ---------------------------------------------------------------------------

PIECES = [
    "word", "Words", "the", "a", "x", "42", "3.14", "v1.2.3", "10.0.0.1", "192.168.1.254", "999.1.1.1",
    "1.2.3.4.5", "user@example.com", "first.last+tag@mail.co.uk", "@property", "a@b", "555-123-4567",
    "+1 (555) 123-4567", "555.123.4567", "+44 20 7946 0958", "123 4567", "12-345-6789", "(02) 1234 5678",
    "café", "naïve", "Über", "日本語", "ελληνικά", "٣٤٥", "١٢٣-٤٥٦-٧٨٩٠", "१२३.४५६.७८९०", "²³", "½", "Ⅻ", "—", "…",
    "“quoted”", "#tag", "...", "_", "__init__", "a_b", "x1", "1x", "--", "-", ".", "(", ")", "!!!", "ß", "İ",
    "\x00", "\x07", "\x0b", "\x0c", "\x1c", "\x1f", "\x7f", "\x85", "\x9f", "\u200b", "\u2060", "\ufeff",
    "\u00a0", "\u2003", "\u3000", "\u2028", "\u2029", "\t", " \t ", "\r\n", "\r", "\n", "\n\n", "\n\n\n\n",
    " \n", "\t\n", "e\u0301", "\ud800",
]
SEPARATORS = [" ", " ", " ", "\n", "  ", "\t", "", "-", ".", " \n ", "\n\n\n"]


def fuzz_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 3, 10, 40, 200])
    return "".join(rng.choice(PIECES) + rng.choice(SEPARATORS) for _ in range(n))


# ---- the check -----------------------------------------------------------------------------


def check(text: str, hasher: dedup.MinHasher, cfgs: list[CleaningConfig]) -> list[str]:
    problems = []
    for form in ("NFC", "NFKC"):
        try:
            expected = ref_normalize(text, form)
        except Exception as exc:  # the same error must come out of the fast path
            try:
                clean.normalize(text, form)
                problems.append(f"normalize {form}: reference raised {exc!r}, fast path did not")
            except type(exc):
                pass
            continue
        if clean.normalize(text, form) != expected:
            problems.append(f"normalize {form}")
    for candidate in (text, ref_normalize(text) if "\ud800" not in text else text):
        c1, c2 = {}, {}
        if clean.scrub_pii(candidate, c1) != ref_scrub_pii(candidate, c2) or c1 != c2:
            problems.append("scrub_pii")
        if "\ud800" in candidate:
            continue
        if clean._alpha_word_fraction(candidate, np.empty(7)) != ref_alpha_words(candidate) / 7:
            problems.append("alpha words")
        words = dedup.split_words(candidate)
        if words != ref_split_words(candidate):
            problems.append("split_words")
        hashes = dedup.word_hashes(words)
        for cfg in cfgs:
            if clean.quality_rule_failed(candidate, hashes, cfg) != ref_quality_rule_failed(candidate, hashes, cfg):
                problems.append("quality_rule_failed")
        for n in (1, 2, 5):
            if clean._repetition(hashes, n) != ref_repetition(hashes, n):
                problems.append(f"repetition {n}")
            if not np.array_equal(clean.ngram_hashes(hashes, n), ref_ngram_hashes(hashes, n)):
                problems.append(f"ngram_hashes {n}")
        shingles = dedup.shingle_set(hashes, 5)
        if not np.array_equal(shingles, ref_shingle_set(hashes, 5)):
            problems.append("shingle_set")
        if not np.array_equal(hasher.signature(shingles), ref_signature(hasher, shingles)):
            problems.append("signature")
    return problems


def documents(paths: list[str]):
    for path in map(Path, paths):
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(columns=["text"]):
                yield from batch.column(0).to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parquet", nargs="*", help="raw_corpus parquet files or directories (column 'text')")
    parser.add_argument("--fuzz", type=int, default=20000)
    parser.add_argument("--max-docs", type=int, default=20000)
    args = parser.parse_args()
    hasher = dedup.MinHasher(128, 1234)
    failures: dict[str, int] = {}
    examples: dict[str, str] = {}
    rng = random.Random(0)
    # Large shingle sets span several hashing chunks.
    big = np.arange(10_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    assert np.array_equal(hasher.signature(big), ref_signature(hasher, big))
    texts = [fuzz_text(rng) for _ in range(args.fuzz)]
    # The defaults, and loose thresholds so that every rule gets evaluated.
    cfgs = [CleaningConfig(), CleaningConfig(min_chars=0, min_words=0, min_mean_word_length=0,
                                             max_mean_word_length=100, max_symbol_word_ratio=10,
                                             min_alpha_word_fraction=0.0, max_duplicate_line_fraction=1,
                                             max_duplicate_paragraph_fraction=1, max_top_2gram_fraction=1,
                                             max_duplicate_5gram_fraction=0.5)]
    n_real = 0
    for k, text in enumerate(texts + list(documents(args.parquet))[: args.max_docs]):
        n_real += k >= len(texts)
        for problem in check(text, hasher, cfgs):
            failures[problem] = failures.get(problem, 0) + 1
            examples.setdefault(problem, text)
    print(f"checked {len(texts)} fuzzed texts and {n_real} real documents")
    if failures:
        for problem, count in failures.items():
            print(f"MISMATCH {problem}: {count} texts, e.g. {examples[problem][:200]!r}")
        sys.exit(1)
    print("all fast paths match the reference implementations")


if __name__ == "__main__":
    main()
