"""Corpus-wide dedup as a partitioned shuffle over tasks, for an engine that spreads work over machines.

The same decisions as corpus_dedup.CorpusDedup (the first document of each content hash is kept; of
each group of near duplicates, the ones the one-pass NearDupIndex keeps in corpus order), reached
without passing the corpus through one process:

  1. map, per part: its units' content hashes and LSH band keys, each with the unit's ref (its index
     among all units in corpus order), in partitions by the value's top bits (one file per part,
     sorted, with an index of where each partition starts: files = parts, not parts x partitions);
  2. reduce, per partition of content hashes: the exact duplicates (ref -> first ref of its hash);
  3. reduce, per partition of band keys, exact duplicates left out: the refs that share a key, as
     edges (the first ref of the key, another ref);
  4. here: the connected components of those edges. Documents of different components share no
     band key, so they are never candidates of each other;
  5. map, per batch of components: NearDupIndex replayed over each component in corpus order. Its
     buckets never mix components, so this gives exactly the decisions of the one-pass index.

The partitions are files under the cleaned_shards directory (data_dir: storage every node reads);
only duplicates and candidate edges come back to this process, never the corpus.
"""

from __future__ import annotations

import heapq
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from llm_core.config import DedupConfig
from llm_core.data import dedup
from llm_core.data.corpus_dedup import NpyRows, UnitArrays, scratch_dir
from llm_core.data.progress import Log
from llm_core.data.repeated_values import isin_sorted
from llm_core.data.engine import Engine
from llm_core.files import save_npy

PARTITION_BYTES = 256 << 20  # about this much (value, ref) data per reduce task


class ShardedDedup:
    """`removed_units[part]`: its duplicate units -> (reason, doc_id of the document kept)."""

    def __init__(self, cfg: DedupConfig, parts: list[dict[str, Path]], work_dir: Path, engine: Engine, log: Log):
        self.cfg, self.parts, self.engine = cfg, parts, engine
        self.arrays = UnitArrays(parts)
        num_values = sum(self.arrays.num_units) * (1 + cfg.bands)
        self.bits = max(2, math.ceil(math.log2(max(1, num_values * 16 / PARTITION_BYTES))))
        self.num_candidates_checked = self.num_candidates = 0
        with scratch_dir(work_dir) as tmp:
            self._partition(tmp)
            exact = self._exact_duplicates(tmp) if cfg.exact else np.empty((0, 2), dtype=np.uint64)
            near = self._near_duplicates(tmp, np.sort(exact[:, 0])) if cfg.near else np.empty((0, 2), dtype=np.uint64)
        log(f"dedup: {len(exact)} exact duplicates; {self.num_candidates} of {sum(self.arrays.num_units)} documents "
            f"share a band key, {len(near)} of them near duplicates ({self.num_candidates_checked} pairs checked); "
            f"{2**self.bits} partitions")
        self.removed_units = self._by_part([("exact_duplicate", exact), ("near_duplicate", near)])

    def _map(self, fn, jobs: list[tuple], what: str) -> list:
        results = [None] * len(jobs)
        for i, result in self.engine.map(fn, jobs, what=what, total=len(jobs)):
            results[i] = result
        return results

    def _partition(self, tmp: Path) -> None:
        jobs = [(part, files["units"], files["signatures"], self.arrays.first_ref[part], self.cfg.model_dump(),
                 tmp, self.bits) for part, files in enumerate(self.parts)]
        self._map(partition_part, jobs, "dedup: partition hashes and band keys")

    def _exact_duplicates(self, tmp: Path) -> np.ndarray:
        jobs = [(tmp / "hashes", p) for p in range(2**self.bits)]
        return np.concatenate(self._map(exact_duplicates, jobs, "dedup: exact groups"))

    def _near_duplicates(self, tmp: Path, exact_refs: np.ndarray) -> np.ndarray:
        jobs = [(tmp / "keys", p, exact_refs) for p in range(2**self.bits)]
        components = _components(np.concatenate(self._map(shared_key_edges, jobs, "dedup: band key groups")))
        self.num_candidates = sum(map(len, components))
        batches = _balanced(components, max(1, 2 * self.engine.parallelism))
        results = self._map(resolve_components, [(self.parts, batch, self.cfg.model_dump()) for batch in batches],
                            "dedup: near-duplicate components")
        self.num_candidates_checked = sum(checked for _, checked in results)
        return np.concatenate([pairs for pairs, _ in results] or [np.empty((0, 2), dtype=np.uint64)])

    def _by_part(self, found: list[tuple[str, np.ndarray]]) -> list[dict[int, tuple[str, str]]]:
        """(reason, (ref, ref of the document kept) pairs) -> per part: unit -> (reason, doc_id kept)."""
        kept_refs = np.unique(np.concatenate([pairs[:, 1] for _, pairs in found]))
        doc_id = dict(zip(kept_refs.tolist(), self._doc_ids(kept_refs)))
        removed: list[dict[int, tuple[str, str]]] = [{} for _ in self.parts]
        for reason, pairs in found:
            for ref, kept in pairs.tolist():
                part, unit = self.arrays.locate(ref)
                removed[part][unit] = (reason, doc_id[kept])
        return removed

    def _doc_ids(self, refs: np.ndarray) -> list[str]:
        """The doc_ids of sorted refs, reading only the parts they are in."""
        part_of = np.searchsorted(self.arrays.first_ref, refs, side="right") - 1
        ids: list[str] = []
        for part in np.unique(part_of).tolist():
            units = (refs[part_of == part] - self.arrays.first_ref[part]).astype(np.int64)
            ids += pq.read_table(self.parts[part]["units"], columns=["doc_id"]).column(0).take(units).to_pylist()
        return ids


# ----------------------------------------------------------------------------------------------
# Tasks (module-level functions: they run in Ray workers or local processes)


def partition_part(part: int, units_path: Path, signatures_path: Path, first_ref: int, dedup_cfg: dict,
                   tmp: Path, bits: int) -> int:
    """Write the part's (content hash, ref) and (band key, ref) pairs into their partitions."""
    cfg = DedupConfig(**dedup_cfg)
    content = pq.read_table(units_path, columns=["content_hash"]).column(0).to_numpy()
    refs = np.arange(first_ref, first_ref + len(content), dtype=np.uint64)
    if cfg.exact:
        _write_partitions(tmp / "hashes", part, content, refs, bits)
    if cfg.near:
        keys = dedup.NearDupIndex(cfg, shingles_of=None).band_keys(np.load(signatures_path))  # (units, bands)
        _write_partitions(tmp / "keys", part, keys.ravel(), np.repeat(refs, cfg.bands), bits)
    return len(content)


def _write_partitions(directory: Path, part: int, values: np.ndarray, refs: np.ndarray, bits: int) -> None:
    """One file of the part's (value, ref) pairs sorted by value, so that each partition is one slice,
    and an index of where each slice starts (written last: it marks the file complete)."""
    order = np.argsort(values, kind="stable")
    pairs = np.stack([values[order], refs[order]], axis=1)
    starts = np.searchsorted(pairs[:, 0], np.arange(2**bits, dtype=np.uint64) << np.uint64(64 - bits))
    directory.mkdir(parents=True, exist_ok=True)
    save_npy(directory / f"{part:06d}.npy", pairs)
    save_npy(directory / f"{part:06d}.index.npy", np.append(starts, len(pairs)))


def _groups(directory: Path, partition: int, leave_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(refs, the first ref of each one's value) of a partition's pairs from every part, sorted by (value, ref)."""
    slices = []
    for index in sorted(directory.glob("*.index.npy")):
        start, end = np.load(index)[partition: partition + 2].tolist()
        slices.append(NpyRows(index.with_name(index.name.replace(".index", ""))).rows(start, end))
    pairs = np.concatenate(slices) if slices else np.empty((0, 2), dtype=np.uint64)
    if leave_out is not None and len(leave_out):
        pairs = pairs[~isin_sorted(pairs[:, 1], leave_out)]
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    values, refs = pairs[order, 0], pairs[order, 1]
    if not len(values):
        return refs, refs
    starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
    first = np.repeat(refs[starts], np.diff(np.append(starts, len(values))))
    return refs, first


def exact_duplicates(directory: Path, partition: int) -> np.ndarray:
    """(ref, first ref with the same content hash) for every later document of a hash."""
    refs, first = _groups(directory, partition)
    later = refs != first
    return np.stack([refs[later], first[later]], axis=1)


def shared_key_edges(directory: Path, partition: int, exact_refs: np.ndarray) -> np.ndarray:
    """Distinct (first ref, ref) edges between the documents that share a band key."""
    refs, first = _groups(directory, partition, leave_out=exact_refs)
    later = refs != first  # a document with the same key in two bands shares it with no one
    return np.unique(np.stack([first[later], refs[later]], axis=1), axis=0)


def resolve_components(parts: list[dict[str, Path]], components: list[np.ndarray],
                       dedup_cfg: dict) -> tuple[np.ndarray, int]:
    """((ref, ref of the near duplicate it matched) pairs, candidates checked) over whole components."""
    cfg, arrays = DedupConfig(**dedup_cfg), UnitArrays(parts)
    found, checked = [], 0
    for component in components:
        index = dedup.NearDupIndex(cfg, arrays.shingles, arrays.signature)
        for ref in component.tolist():
            match = index.find_or_add(ref, arrays.signature(ref), arrays.shingles(ref))
            if match is not None:
                found.append((ref, match))
        checked += index.num_candidates_checked
    arrays.close()
    return np.array(found, dtype=np.uint64).reshape(-1, 2), checked


# ----------------------------------------------------------------------------------------------


def _components(edges: np.ndarray) -> list[np.ndarray]:
    """The connected components (sorted refs) of an undirected graph given as (ref, ref) edges."""
    if not len(edges):
        return []
    nodes = np.unique(edges)
    a, b = np.searchsorted(nodes, edges[:, 0]), np.searchsorted(nodes, edges[:, 1])
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (a, b)), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=False)
    order = np.lexsort((nodes, labels))
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(nodes[order], bounds)


def _balanced(components: list[np.ndarray], num_batches: int) -> list[list[np.ndarray]]:
    """Components in at most num_batches batches of about equal numbers of refs (largest first)."""
    batches: list[list[np.ndarray]] = [[] for _ in range(min(num_batches, len(components)))]
    loads = [(0, i) for i in range(len(batches))]
    for component in sorted(components, key=len, reverse=True):
        load, i = heapq.heappop(loads)
        batches[i].append(component)
        heapq.heappush(loads, (load + len(component), i))
    return batches
