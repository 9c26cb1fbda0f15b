"""Which values of a long stream of 64-bit hashes occur more than once, in memory bounded by a
buffer and one partition rather than by the stream.

Corpus-wide dedup only has to remember the hashes (content hashes, LSH band keys) that another
document shares: a hash that occurs once in the whole corpus can never make a duplicate, and on a
real corpus those are the vast majority. Values are buffered, sorted and appended to on-disk
partitions by their top bits (hashes are uniform, so partitions come out about equal); at the end
each partition is sorted on its own and its repeated values kept.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from llm_core.data.dedup import sorted_unique

EMPTY = np.empty(0, dtype=np.uint64)


class RepeatedValues:
    """Collects uint64 values with `add`; `repeated()` returns those added more than once."""

    def __init__(self, directory: Path, expected: int, partition_bytes: int = 32 << 20,
                 buffer_values: int = 1 << 21):
        """`expected`: about how many values will be added (it sets the number of partitions;
        more values only make the partitions larger)."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._bits = max(0, math.ceil(math.log2(max(1, expected * 8 / partition_bytes))))
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._buffer_values = buffer_values

    def _path(self, partition: int) -> Path:
        return self.directory / f"{partition:05d}.u64"

    def add(self, values: np.ndarray) -> None:
        if values.size:
            self._buffer.append(values.astype(np.uint64).ravel())  # a copy: never keeps a caller's array alive
            self._buffered += values.size
            if self._buffered >= self._buffer_values:
                self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        values = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        values.sort()  # sorted by value is sorted by partition: each partition is one slice
        shift = np.uint64(64 - self._bits)
        starts = np.searchsorted(values, np.arange(2**self._bits, dtype=np.uint64) << shift) if self._bits else [0]
        for partition, (start, end) in enumerate(zip(starts, [*starts[1:], len(values)])):
            if end > start:
                with open(self._path(partition), "ab") as fh:
                    values[start:end].tofile(fh)

    def repeated(self) -> np.ndarray:
        """The distinct values added more than once, sorted. Deletes the partitions."""
        self._flush()
        found = []
        for partition in range(2**self._bits):  # partition p holds the p-th range of values: results come sorted
            path = self._path(partition)
            if path.exists():
                values = np.fromfile(path, dtype=np.uint64)
                path.unlink()
                values.sort()
                found.append(sorted_unique(values[1:][values[1:] == values[:-1]]))
        return np.concatenate(found) if found else EMPTY


def isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Boolean mask of `values` (any shape) found in `sorted_set` (np.isin, without re-sorting the set)."""
    if not len(sorted_set):
        return np.zeros(values.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values
