"""Corpus-wide dedup over the cleaned parts' cached hashes and signatures, in bounded memory.

Reads what cleaned_shards cached per part (its dedup units with their content hashes, MinHash
signatures, shingle sets and offsets) and decides, part by part in corpus order, which documents are
exact or near duplicates of an earlier one. The primitives (MinHash, LSH, exact Jaccard) are in
dedup.py; finding the values that repeat across the corpus is repeated_values.py.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_core.config import DedupConfig
from llm_core.data import dedup, repeated_values
from llm_core.files import TMP_MARK


class CorpusDedup:
    """Which documents of the cleaned parts are exact or near duplicates, part by part in corpus order.

    The unit is a source document with at least one kept piece (its kept pieces hashed and shingled as
    one text by cleaned_shards.clean_part); a duplicate document is removed with all its kept pieces.
    The decisions are those of a single pass remembering every content hash and every LSH band key:
    the first document of each content hash is kept, and NearDupIndex keeps the first of each group
    of near duplicates among the rest. But only a hash or a key that another document shares can ever
    make a duplicate, so two cheap passes first find those (spilled to disk: repeated_values.RepeatedValues)
    and the deciding pass remembers nothing else. Memory grows with the number of duplicates and
    LSH candidates, not with the corpus.
      pass 1 (if exact): the content hashes that repeat;
      pass 2: the exact duplicates, and the band keys that repeat among the other documents;
      pass 3 (`removed_units`): near duplicates, indexing only the documents that have a repeated key.
    A document's ref is its index among all units in corpus order (a signature row).
    """

    def __init__(self, cfg: DedupConfig, parts: list[dict[str, Path]], work_dir: Path):
        self.cfg, self.parts = cfg, parts
        self.arrays = UnitArrays(parts)
        num_units = self.arrays.num_units
        self.first_ref = self.arrays.first_ref
        self.index = dedup.NearDupIndex(cfg, self.arrays.shingles, self.arrays.signature) if cfg.near else None
        self.exact: list[dict[int, tuple[str, str]]] = []  # per part: unit -> ("exact_duplicate", doc_id of the first)
        self.repeated_keys = repeated_values.EMPTY
        with scratch_dir(work_dir) as tmp:
            self._find_exact_and_repeated_keys(tmp, sum(num_units))

    def _units(self, part: int, with_ids: bool = False) -> pa.Table:
        """The part's units: content_hash (and doc_id); row k is row k of its signature and shingle arrays."""
        return pq.read_table(self.parts[part]["units"], columns=["content_hash"] + ["doc_id"] * with_ids)

    def _offered(self, part: int, num_units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the units that are not exact duplicates, the part's signatures, their band keys)."""
        offered = np.flatnonzero(~np.isin(np.arange(num_units), list(self.exact[part])))
        signatures = np.load(self.parts[part]["signatures"])
        return offered, signatures, self.index.band_keys(signatures[offered])

    def _find_exact_and_repeated_keys(self, tmp: Path, num_units: int) -> None:
        repeated_hashes = repeated_values.EMPTY
        if self.cfg.exact:
            hashes = repeated_values.RepeatedValues(tmp / "hashes", num_units)
            for part in range(len(self.parts)):
                hashes.add(self._units(part).column("content_hash").to_numpy())
            repeated_hashes = hashes.repeated()
        keys = repeated_values.RepeatedValues(tmp / "keys", num_units * self.cfg.bands)
        first_with_hash: dict[int, str] = {}  # repeated hashes only
        for part in range(len(self.parts)):
            units = self._units(part, with_ids=self.cfg.exact)
            content = units.column("content_hash").to_numpy()
            exact = {}
            for k in np.flatnonzero(repeated_values.isin_sorted(content, repeated_hashes)).tolist():
                content_hash = int(content[k])
                if content_hash in first_with_hash:
                    exact[k] = ("exact_duplicate", first_with_hash[content_hash])
                else:
                    first_with_hash[content_hash] = units.column("doc_id")[k].as_py()
            self.exact.append(exact)
            if self.index is not None:
                keys.add(self._offered(part, units.num_rows)[2])
        self.repeated_keys = keys.repeated()

    @property
    def num_candidates_checked(self) -> int:
        return self.index.num_candidates_checked if self.index else 0

    def removed_units(self) -> Iterator[dict[int, tuple[str, str]]]:
        """For each part in corpus order: its duplicate units -> (reason, doc_id of the document kept)."""
        id_of_ref: dict[int, str] = {}  # indexed documents only
        for part in range(len(self.parts)):
            units = self._units(part, with_ids=self.index is not None)
            removed_units: dict[int, tuple[str, str]] = {}
            if self.index is not None:
                offered, signatures, keys = self._offered(part, units.num_rows)
                shared = repeated_values.isin_sorted(keys, self.repeated_keys)
                for j in np.flatnonzero(shared.any(axis=1)).tolist():  # the others cannot match or be matched
                    k = int(offered[j])
                    ref = self.first_ref[part] + k
                    match = self.index.find_or_add(ref, signatures[k], self.arrays.shingles(ref),
                                                   keys=keys[j][shared[j]].tolist())
                    if match is None:
                        id_of_ref[ref] = units.column("doc_id")[k].as_py()
                    else:
                        removed_units[k] = ("near_duplicate", id_of_ref[match])
            removed_units.update(self.exact[part])
            self.exact[part] = {}
            yield removed_units
        self.arrays.close()


@contextlib.contextmanager
def scratch_dir(work_dir: Path) -> Iterator[Path]:
    """A temporary directory for dedup's spilled values, removed after (and those of killed runs)."""
    for leftover in work_dir.glob(f"dedup{TMP_MARK}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"dedup{TMP_MARK}", dir=work_dir) as tmp:
        yield Path(tmp)


class UnitArrays:
    """The dedup units' signatures and shingle sets of every part, read by ref (a unit's index among
    all units in corpus order) with a few parts' files open at a time."""

    def __init__(self, parts: list[dict[str, Path]]):
        self.parts = parts
        self.num_units = [len(NpyRows(files["offsets"])) - 1 for files in parts]
        self.first_ref = np.cumsum([0] + self.num_units).tolist()
        self._arrays = functools.lru_cache(maxsize=32)(self._open)  # open files of the parts last read

    def locate(self, ref: int) -> tuple[int, int]:
        """(part, unit) of a ref."""
        part = bisect.bisect_right(self.first_ref, ref) - 1
        return part, ref - self.first_ref[part]

    def _open(self, part: int) -> dict[str, NpyRows]:
        return {name: NpyRows(self.parts[part][name]) for name in ("signatures", "shingles", "offsets")}

    def signature(self, ref: int) -> np.ndarray:
        part, k = self.locate(ref)
        return self._arrays(part)["signatures"].rows(k, k + 1)[0]

    def shingles(self, ref: int) -> np.ndarray:
        part, k = self.locate(ref)
        arrays = self._arrays(part)
        start, end = arrays["offsets"].rows(k, k + 2).tolist()
        return arrays["shingles"].rows(start, end)

    def close(self) -> None:
        self._arrays.cache_clear()  # closes the files


class NpyRows:
    """Rows of a .npy file read on demand with pread. Not a memory map: the pages of a map stay in the
    process's RSS until it is unmapped, and dedup reads scattered rows of every part."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        version = np.lib.format.read_magic(self._file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, self.dtype = read_header(self._file)
        self._len, self._shape = shape[0], shape[1:]
        self._row_bytes = self.dtype.itemsize * int(np.prod(self._shape))
        self._start = self._file.tell()

    def __len__(self) -> int:
        return self._len

    def rows(self, start: int, stop: int) -> np.ndarray:
        data = os.pread(self._file.fileno(), (stop - start) * self._row_bytes, self._start + start * self._row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(-1, *self._shape)

