"""llm_core.data.repeated_values: the values added more than once, found through partitions on disk."""

from __future__ import annotations

import numpy as np
import pytest

from llm_core.data.repeated_values import RepeatedValues, isin_sorted


@pytest.mark.parametrize("partition_bytes", [1 << 30, 4096])  # one partition; many, each flushed to many times
def test_repeated_values_finds_exactly_the_values_added_twice(tmp_path, partition_bytes):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**64, size=20_000, dtype=np.uint64)
    values = np.concatenate([values, values[:500], values[:100], np.array([0, 0, 2**64 - 1, 2**64 - 1], np.uint64)])
    rng.shuffle(values)
    finder = RepeatedValues(tmp_path / "spill", expected=len(values), partition_bytes=partition_bytes,
                            buffer_values=1000)
    for chunk in np.array_split(values, 37):
        finder.add(chunk.reshape(-1, 1))
    unique, counts = np.unique(values, return_counts=True)
    repeated = finder.repeated()
    assert np.array_equal(repeated, unique[counts > 1]) and len(repeated) == 502
    assert not list((tmp_path / "spill").iterdir())
    assert np.array_equal(isin_sorted(values, repeated), np.isin(values, repeated))
    assert not isin_sorted(values, np.empty(0, np.uint64)).any()
