"""Exact and near-duplicate detection across the whole corpus.

Near duplicates: MinHash over word n-gram shingles, vectorized with numpy (one 64-bit hash per
word from xxhash, n-grams combined arithmetically, `num_permutations` hash functions of the form
a·x + b mod 2^64), then LSH banding to find candidates, and each candidate pair confirmed by the
exact Jaccard similarity of the two shingle sets. Confirming exactly keeps recall near 100% at
the threshold itself (a 128-permutation estimate alone misses about half of the pairs whose true
similarity sits right at the threshold) and never removes a pair below it.

Memory per indexed document: its LSH bucket entries and (unless `signature_of` reads them from disk)
its signature, nothing that grows with length (shingle sets stay on disk, read when a
candidate needs confirming). Given only the band keys that some other document shares, the index
holds just the documents that can ever be candidates (see corpus_dedup.CorpusDedup).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import xxhash

from llm_core.config import DedupConfig
from llm_core.data.clean import ngram_hashes

_CHUNK = 1024  # shingles hashed at a time: bounds the (chunk × permutations) buffer (1 MB at 128)
_ROW_MIX = np.uint64(0xC2B2AE3D27D4EB4F)
_MAX = np.iinfo(np.uint64).max
_ESTIMATE_SLACK = 0.15  # candidates whose estimated similarity is this far below the threshold are skipped


def split_words(text: str) -> list[bytes]:
    """Lower-cased, whitespace-separated words as UTF-8 bytes (what the hashes below take)."""
    if text.isascii():  # same result; bytes.lower() is a table lookup, str.lower() is not
        return text.encode("ascii").lower().split()
    return text.lower().encode("utf-8").split()


def word_hashes(words: list[bytes]) -> np.ndarray:
    """A stable 64-bit hash per word."""
    return np.fromiter(map(xxhash.xxh3_64_intdigest, words), dtype=np.uint64, count=len(words))


def content_hash(words: list[bytes]) -> int:
    """Hash of the text with case and whitespace normalized: equal for exact duplicates."""
    return xxhash.xxh3_64_intdigest(b" ".join(words))


def shingle_set(hashes: np.ndarray, shingle_words: int) -> np.ndarray:
    """The document's distinct shingles (word n-grams) as sorted uint64; short docs are one shingle."""
    if len(hashes) == 0:
        return np.empty(0, dtype=np.uint64)
    n = min(shingle_words, len(hashes))
    return sorted_unique(ngram_hashes(hashes, n))


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique(values) for a 1-d array, without its overhead (which dominates for small arrays).
    Sorts `values` in place."""
    values.sort()
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted sets of unique values."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class MinHasher:
    def __init__(self, num_permutations: int, seed: int):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_permutations, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_permutations, dtype=np.uint64)
        # Reused for every document: fresh (chunk × permutations) temporaries cost page faults.
        self._buffer = np.empty((_CHUNK, num_permutations), dtype=np.uint64)
        self._chunk_min = np.empty(num_permutations, dtype=np.uint64)

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """(num_permutations,) uint64: the minimum of each hash function over the shingles."""
        sig = np.full(len(self.a), _MAX, dtype=np.uint64)
        for start in range(0, len(shingles), _CHUNK):
            chunk = shingles[start: start + _CHUNK, None]
            values = self._buffer[: len(chunk)]
            np.multiply(chunk, self.a, out=values)
            np.add(values, self.b, out=values)
            np.minimum(sig, values.min(axis=0, out=self._chunk_min), out=sig)
        return sig


class DocumentSketch:
    """What dedup needs of one source document, fed its pieces in order: the content hash, MinHash
    signature and shingle set of the whole document, as if it had never been cut. The shingles that
    span the boundary between two pieces count too (the last `shingle_words - 1` words of a piece
    are carried over). The shingle set is kept as the distinct high 32 bits of the shingles:
    plenty to confirm a candidate's Jaccard similarity exactly, at half the size."""

    def __init__(self, hasher: MinHasher, shingle_words: int):
        self.hasher, self.shingle_words = hasher, shingle_words
        self._content = xxhash.xxh3_64()
        self._num_words = 0
        self._signature: np.ndarray | None = None
        self._shingles: list[np.ndarray] = []
        self._tail = np.empty(0, dtype=np.uint64)  # the last words so far, up to shingle_words - 1

    def add(self, words: list[bytes], hashes: np.ndarray) -> None:
        """The next piece, as `split_words` and `word_hashes` of its text."""
        if self._num_words:
            self._content.update(b" ")
        self._content.update(b" ".join(words))
        self._num_words += len(hashes)
        if len(self._tail):
            hashes = np.concatenate((self._tail, hashes))
        if len(hashes) >= self.shingle_words:
            self._add_shingles(sorted_unique(ngram_hashes(hashes, self.shingle_words)))
        self._tail = hashes[max(0, len(hashes) - self.shingle_words + 1):].copy()

    def _add_shingles(self, shingles: np.ndarray) -> None:
        signature = self.hasher.signature(shingles)
        self._signature = signature if self._signature is None else np.minimum(self._signature, signature)
        # `shingles` is sorted, so its high halves are too: dropping repeats is np.unique.
        high = (shingles >> np.uint64(32)).astype(np.uint32)
        self._shingles.append(high[np.concatenate(([True], high[1:] != high[:-1]))])

    def finish(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(content hash, signature, shingles): `content_hash` of the document's words, the MinHash
        signature of its `shingle_set`, and that set's distinct high 32 bits, sorted (uint32)."""
        if 0 < self._num_words < self.shingle_words:  # shorter than a shingle: one shingle (all in the tail)
            self._add_shingles(shingle_set(self._tail, self.shingle_words))
        if self._signature is None:  # no words
            self._add_shingles(np.empty(0, dtype=np.uint64))
        shingles = self._shingles[0] if len(self._shingles) == 1 else sorted_unique(np.concatenate(self._shingles))
        return self._content.intdigest(), self._signature, shingles


class NearDupIndex:
    """Keeps the first of every group of near duplicates, in the order documents are offered.

    `shingles_of(ref)` returns the shingle set of an already indexed document, for confirmation;
    `signature_of(ref)` its signature, if they are to be read from elsewhere rather than kept here.
    """

    def __init__(self, cfg: DedupConfig, shingles_of: Callable[[int], np.ndarray],
                 signature_of: Callable[[int], np.ndarray] | None = None):
        self.threshold = cfg.threshold
        self.bands = cfg.bands
        self.rows = cfg.num_permutations // cfg.bands
        rng = np.random.default_rng(cfg.seed + 1)
        self.row_weights = rng.integers(1, 2**63, size=self.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.band_salts = [int(s) for s in rng.integers(0, 2**63, size=self.bands, dtype=np.uint64)]
        self._salts = np.array(self.band_salts, dtype=np.uint64)
        self.buckets: dict[int, int | list[int]] = {}
        self.signatures: dict[int, np.ndarray] = {}  # only filled without `signature_of`
        self.shingles_of = shingles_of
        self.signature_of = signature_of or self.signatures.__getitem__
        self._keep_signatures = signature_of is None
        self.num_candidates_checked = 0

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(n, bands) uint64: the LSH bucket key of each band of each of n signatures (n, num_permutations)."""
        per_band = (signatures.reshape(len(signatures), self.bands, self.rows) * self.row_weights).sum(
            axis=2, dtype=np.uint64)
        per_band ^= per_band >> np.uint64(29)
        per_band *= _ROW_MIX
        per_band ^= self._salts
        return per_band

    def find_or_add(self, ref: int, signature: np.ndarray, shingles: np.ndarray,
                    keys: list[int] | None = None) -> int | None:
        """The ref of an indexed near duplicate of this document, or None (and the doc is indexed).

        `keys`: the document's band keys if already computed (`band_keys(...).tolist()`), or only those
        that another document offered in this run has too: a key no other document has never makes a
        candidate, so leaving it out gives the same answers, with less memory.
        """
        if keys is None:
            keys = self.band_keys(signature[None])[0].tolist()  # Python ints: iterating numpy scalars is slower
        # Most documents share no band with any other: one pass of dict lookups settles that.
        entries = [entry for entry in map(self.buckets.get, keys) if entry is not None]
        seen: set[int] = set()
        for entry in entries:
            for other in entry if isinstance(entry, list) else (entry,):
                if other in seen:
                    continue
                seen.add(other)
                estimate = float(np.mean(self.signature_of(other) == signature))
                if estimate < self.threshold - _ESTIMATE_SLACK:
                    continue
                self.num_candidates_checked += 1
                if jaccard(shingles, self.shingles_of(other)) >= self.threshold:
                    return other
        if not entries:  # all buckets new (the common case): insert them in one C-level call
            self.buckets.update(dict.fromkeys(keys, ref))
        else:
            for key in keys:
                entry = self.buckets.get(key)
                if entry is None:
                    self.buckets[key] = ref
                elif isinstance(entry, list):
                    entry.append(ref)
                else:
                    self.buckets[key] = [entry, ref]
        if self._keep_signatures:
            self.signatures[ref] = signature
        return None
