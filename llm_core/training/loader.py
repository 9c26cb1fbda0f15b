"""Batches of token windows from the tokenized dataset, memory-mapped.

A training batch is a pure function of (seed, step): the global batch of step s holds
`batch_size * world_size` windows drawn from a generator seeded with (seed, s), and rank r takes
its own slice. So ranks never see the same window of a step, a 2-rank run sees exactly the data of
a 1-rank run with the same global batch, and resuming only needs the step (`state_dict`).

Two ways to choose windows:
- "random": any offset in the split (the nanoGPT way);
- "document": windows start at a document start, so a sample never begins mid-document
  (it may run on into the next document, after the <|endoftext|> boundary).

With a mixture (training.mixture, source name -> weight), every window lies inside one source (its
documents are consecutive in a token file: a run of them is a segment), and window k of the training
(k counts the windows of every step and rank) comes from the source whose slice of [0, 1) holds
frac(k * golden ratio): a low-discrepancy sequence, so over any stretch of steps each source's share of
windows, and of tokens, is its weight to within a few windows. Without a mixture, windows are drawn from
the whole split as before (a source's share is its share of the tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from llm_core.files import read_json

PACKING_MODES = ("random", "document")
GOLDEN = (5 ** 0.5 - 1) / 2


def memory_map(path: Path, column: str) -> np.ndarray:
    """A column of an uncompressed Arrow IPC file as a zero-copy numpy view of the mapped file."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    chunks = table.column(column).chunks
    if len(chunks) != 1:
        return table.column(column).to_numpy()  # several record batches: one copy
    return chunks[0].to_numpy(zero_copy_only=True)


class TokenSplit:
    """All token files of one split: arrays, document starts, and a global index over them."""

    def __init__(self, dataset_dir: Path, split: str):
        manifest = read_json(dataset_dir / "manifest.json")
        if not manifest:
            raise FileNotFoundError(f"no tokenized dataset under {dataset_dir}: materialize `tokenized_dataset`")
        self.vocab_size, self.eot_id = manifest["vocab_size"], manifest["eot_id"]
        self.dtype = np.dtype(manifest["dtype"])
        if np.iinfo(self.dtype).max < self.vocab_size - 1:
            raise ValueError(f"token dtype {self.dtype} cannot hold vocab size {self.vocab_size}")
        self.sources: list[str] = manifest.get("sources", [])  # names; doc_sources index into it
        self.arrays: list[np.ndarray] = []
        self.doc_starts: list[np.ndarray] = []
        self.doc_paths: list[Path] = []
        for shard in manifest["shards"]:
            stem = Path(shard["name"]).stem
            tokens = memory_map(dataset_dir / split / f"{stem}.tokens.arrow", "tokens")
            if tokens.dtype != self.dtype:
                raise ValueError(f"{stem}: tokens are {tokens.dtype}, the manifest says {self.dtype}")
            if len(tokens):
                self.arrays.append(tokens)
                self.doc_paths.append(dataset_dir / split / f"{stem}.docs.arrow")
                self.doc_starts.append(memory_map(self.doc_paths[-1], "start"))
        self.num_tokens = sum(len(a) for a in self.arrays)

    def doc_sources(self) -> list[np.ndarray]:
        """Per array, the source of each document (an index into self.sources)."""
        if not self.sources:
            raise ValueError("the tokenized dataset predates named sources: materialize `tokenized_dataset` again")
        index = {name: i for i, name in enumerate(self.sources)}
        out = []
        for path in self.doc_paths:
            names = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all().column("source").combine_chunks()
            codes = names.dictionary_encode()
            lookup = np.array([index[n] for n in codes.dictionary.to_pylist()], dtype=np.int32)
            out.append(lookup[codes.indices.to_numpy()] if len(codes) else np.empty(0, dtype=np.int32))
        return out

    def segments(self) -> list[tuple[int, int, int, int]]:
        """(source, array, start, end) of every run of consecutive documents of one source."""
        out = []
        for a, (starts, sources) in enumerate(zip(self.doc_starts, self.doc_sources())):
            if not len(starts):
                continue
            cut = np.flatnonzero(np.diff(sources)) + 1  # first document of each new run
            firsts = np.concatenate([[0], cut])
            ends = np.concatenate([starts[cut], [len(self.arrays[a])]])
            out += [(int(sources[f]), a, int(starts[f]), int(e)) for f, e in zip(firsts, ends)]
        return out


class WindowPool:
    """The window starts to draw from, as runs (array, offsets or None, first, count): a draw picks one of
    all the runs' windows uniformly, by index."""

    def __init__(self, runs: list[tuple[int, np.ndarray | None, int, int]]):
        self.runs = [r for r in runs if r[3] > 0]
        self.cumulative = np.cumsum([r[3] for r in self.runs], dtype=np.int64)
        self.size = int(self.cumulative[-1]) if len(self.runs) else 0

    def locate(self, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(array, start) of each picked window index."""
        which = np.searchsorted(self.cumulative, picks, side="right")
        local = picks - np.concatenate([[0], self.cumulative])[which]
        arrays, starts = np.empty(len(picks), dtype=np.int64), np.empty(len(picks), dtype=np.int64)
        for r in np.unique(which):
            rows = which == r
            array, offsets, first, _ = self.runs[r]
            arrays[rows] = array
            starts[rows] = first + local[rows] if offsets is None else offsets[local[rows]]
        return arrays, starts


def _runs(array: int, lo: int, hi: int, doc_starts: np.ndarray, window: int, packing: str):
    """The window run of tokens [lo, hi) of one array: any start (random) or document starts."""
    if packing == "random":
        return array, None, lo, max(hi - lo - window + 1, 0)
    starts = doc_starts[(doc_starts >= lo) & (doc_starts <= hi - window)]
    return array, starts, 0, len(starts)


def mixture_bounds(weights: dict[str, float]) -> np.ndarray:
    """The end of each source's slice of [0, 1): the cumulative normalized weights."""
    total = sum(weights.values())
    return np.cumsum([w / total for w in weights.values()])


def mixture_sources(bounds: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The source (index into the mixture) of windows k: frac(k * golden ratio) against the mixture's
    bounds, so any stretch of windows holds each source in proportion to its weight."""
    return np.minimum(np.searchsorted(bounds, np.modf(k * GOLDEN)[0], side="right"), len(bounds) - 1)


class StepBatches:
    """Iterating yields batch_at(step) for step = self.step, self.step + 1, ...: resuming sets the step."""

    step = 0

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            x, y = self.batch_at(self.step)
            self.step += 1
            yield x, y


class TokenWindows(StepBatches):
    """Training batches (x, y) of shape (batch_size, block_size) for one rank."""

    def __init__(self, dataset_dir: Path, split: str, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, packing: str = "random",
                 mixture: dict[str, float] | None = None):
        if packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, got {packing!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.data = TokenSplit(Path(dataset_dir), split)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size, self.packing = rank, world_size, packing
        self.step = 0
        window = block_size + 1
        if not mixture:
            self.mixture = None
            self.pool = WindowPool([_runs(a, 0, len(array), starts, window, packing)
                                    for a, (array, starts) in enumerate(zip(self.data.arrays, self.data.doc_starts))])
            if self.pool.size == 0:
                raise ValueError(f"the {split} split ({self.data.num_tokens} tokens) is shorter than one window of "
                                 f"{window} tokens: lower model.block_size or add data")
            return
        self.mixture = {name: w for name, w in mixture.items() if w > 0}
        unknown = [name for name in self.mixture if name not in self.data.sources]
        if unknown:
            raise ValueError(f"training.mixture: the {split} split has no tokens of source {unknown[0]!r} "
                             f"(sources: {self.data.sources})")
        runs: dict[int, list] = {self.data.sources.index(name): [] for name in self.mixture}
        for source, a, lo, hi in self.data.segments():
            if source in runs:  # packing within a source: a window never crosses into another
                runs[source].append(_runs(a, lo, hi, self.data.doc_starts[a], window, packing))
        # One pool, the sources' windows one after another: source i's are [offset[i], offset[i] + size[i]).
        sizes = [WindowPool(runs[self.data.sources.index(name)]).size for name in self.mixture]
        for name, size in zip(self.mixture, sizes):
            if size == 0:
                raise ValueError(f"training.mixture: source {name!r} has no run of documents as long as one window "
                                 f"({window} tokens) in the {split} split: lower model.block_size, or give it no "
                                 f"weight")
        self.pool = WindowPool([r for name in self.mixture for r in runs[self.data.sources.index(name)]])
        self.source_size = np.array(sizes, dtype=np.int64)
        self.bounds = mixture_bounds(self.mixture)
        self.source_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def _global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(array, start) of every window of `step`, every rank's (a pure function of seed and step)."""
        rng = np.random.default_rng([self.seed, step])
        n = self.batch_size * self.world_size
        if self.mixture is None:
            return self.pool.locate(rng.integers(0, self.pool.size, size=n))
        sources = mixture_sources(self.bounds, np.arange(step * n, (step + 1) * n, dtype=np.float64))
        within = (rng.random(n) * self.source_size[sources]).astype(np.int64)  # uniform in the window's source
        return self.pool.locate(self.source_offset[sources] + within)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch this rank trains on at `step` (a pure function of seed, step and rank)."""
        arrays, starts = self._global_batch(step)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        arrays, starts = arrays[mine], starts[mine]
        window = self.block_size + 1
        out = np.empty((self.batch_size, window), dtype=np.int64)
        for a in np.unique(arrays):  # one vectorized gather per memory-mapped array
            rows = np.nonzero(arrays == a)[0]
            out[rows] = self.data.arrays[a][starts[rows][:, None] + np.arange(window)]
        batch = torch.from_numpy(out)
        return batch[:, :-1], batch[:, 1:]

    def tokens_per_source(self, steps: int) -> dict[str, int]:
        """Trained tokens per source over loader steps [0, steps), every rank's: the very windows drawn
        (replayed, no token read). Without a mixture a window counts for the source it starts in."""
        counts = np.zeros(len(self.mixture or self.data.sources), dtype=np.int64)
        if self.mixture is not None:
            n = self.batch_size * self.world_size
            for first in range(0, steps * n, 1 << 20):  # in chunks: bounded memory for long trainings
                k = np.arange(first, min(first + (1 << 20), steps * n), dtype=np.float64)
                counts += np.bincount(mixture_sources(self.bounds, k), minlength=len(counts))
            return {name: int(c) * self.block_size for name, c in zip(self.mixture, counts)}
        if not self.data.sources:  # a dataset tokenized before sources had names: nothing to count by
            return {}
        doc_sources = self.data.doc_sources()
        for step in range(steps):
            arrays, starts = self._global_batch(step)
            for a in np.unique(arrays):
                doc = np.searchsorted(self.data.doc_starts[a], starts[arrays == a], side="right") - 1
                counts += np.bincount(doc_sources[a][doc], minlength=len(counts))
        return {name: int(c) * self.block_size for name, c in zip(self.data.sources, counts)}

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "world_size": self.world_size, "packing": self.packing,
                "mixture": self.mixture}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["packing"] != self.packing or state.get("mixture") != self.mixture:
            raise ValueError("loader state is from a run with another seed, packing mode or mixture")
        self.step = state["step"]


def sequential_batches(dataset_dir: Path, split: str, block_size: int, batch_size: int,
                       rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every token of the split predicted once (non-overlapping windows), for evaluation.
    Ranks take interleaved windows; together they cover the split exactly once. A chat fine-tune's
    dataset: its packed rows, each once."""
    if is_sft_dataset(dataset_dir):
        x, y = sft_rows(dataset_dir, split)
        x, y = x[rank::world_size], y[rank::world_size]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    data = TokenSplit(Path(dataset_dir), split)
    windows = [(a, start) for a, array in enumerate(data.arrays)
               for start in range(0, len(array) - 1, block_size)]
    mine = windows[rank::world_size]
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        x = torch.full((len(chunk), block_size), data.eot_id, dtype=torch.long)
        y = torch.full((len(chunk), block_size), -100, dtype=torch.long)  # -100: ignored by cross_entropy
        for row, (a, start) in enumerate(chunk):
            piece = torch.from_numpy(data.arrays[a][start:start + block_size + 1].astype(np.int64))
            x[row, :len(piece) - 1] = piece[:-1]
            y[row, :len(piece) - 1] = piece[1:]
        yield x, y


# ---------------------------------------------------------------------------------------------
# the chat fine-tune's rows (llm_core/chat/sft_dataset.py)


def is_sft_dataset(dataset_dir: Path) -> bool:
    return read_json(Path(dataset_dir) / "manifest.json").get("kind") == "sft"


def sft_rows(dataset_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of every packed row of a split: y is -100 where the token is not learned (the prompt, padding)."""
    tokens = torch.from_numpy(np.load(Path(dataset_dir) / f"{split}.tokens.npy").astype(np.int64))
    learned = torch.from_numpy(np.load(Path(dataset_dir) / f"{split}.mask.npy")).bool()
    return tokens[:, :-1], tokens[:, 1:].masked_fill(~learned[:, 1:], -100)


class PackedRows(StepBatches):
    """Training batches of the chat fine-tune: packed rows of whole conversations, a pure function of
    (seed, step) as TokenWindows' (each pass over the rows is a permutation seeded with (seed, pass));
    rank r takes its slice of each step's global batch."""

    def __init__(self, dataset_dir: Path, split: str, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.x, self.y = sft_rows(dataset_dir, split)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.step = 0

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, rows = self.batch_size * self.world_size, len(self.x)
        k = np.arange(step * n + self.rank * self.batch_size, step * n + (self.rank + 1) * self.batch_size)
        orders = {p: np.random.default_rng([self.seed, p]).permutation(rows) for p in np.unique(k // rows)}
        picks = np.array([orders[position // rows][position % rows] for position in k], dtype=np.int64)
        return self.x[picks], self.y[picks]

    def tokens_per_source(self, steps: int) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "world_size": self.world_size, "kind": "sft"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "sft" or state["seed"] != self.seed:
            raise ValueError("loader state is from another kind of run or another seed")
        self.step = state["step"]
