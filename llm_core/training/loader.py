"""Batches of token windows from the tokenized dataset, memory-mapped.

A training batch is a pure function of (seed, step): the global batch of step s holds
`batch_size * world_size` windows drawn from a generator seeded with (seed, s), and rank r takes
its own slice. So ranks never see the same window of a step, a 2-rank run sees exactly the data of
a 1-rank run with the same global batch, and resuming only needs the step (`state_dict`).

Two ways to choose windows:
- "random": any offset in the split (the nanoGPT way);
- "document": windows start at a document start, so a sample never begins mid-document
  (it may run on into the next document, after the <|endoftext|> boundary).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from llm_core.files import read_json

PACKING_MODES = ("random", "document")


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
        self.arrays: list[np.ndarray] = []
        self.doc_starts: list[np.ndarray] = []
        for shard in manifest["shards"]:
            stem = Path(shard["name"]).stem
            tokens = memory_map(dataset_dir / split / f"{stem}.tokens.arrow", "tokens")
            if tokens.dtype != self.dtype:
                raise ValueError(f"{stem}: tokens are {tokens.dtype}, the manifest says {self.dtype}")
            if len(tokens):
                self.arrays.append(tokens)
                self.doc_starts.append(memory_map(dataset_dir / split / f"{stem}.docs.arrow", "start"))
        self.num_tokens = sum(len(a) for a in self.arrays)


class TokenWindows:
    """Training batches (x, y) of shape (batch_size, block_size) for one rank."""

    def __init__(self, dataset_dir: Path, split: str, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, packing: str = "random"):
        if packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, got {packing!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.data = TokenSplit(Path(dataset_dir), split)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size, self.packing = rank, world_size, packing
        self.step = 0
        # Valid window starts per array, as counts, so one draw picks (array, start) uniformly.
        window = block_size + 1
        if packing == "random":
            self.starts = [None] * len(self.data.arrays)
            counts = [max(len(a) - window + 1, 0) for a in self.data.arrays]
        else:
            self.starts = [s[s <= len(a) - window] for a, s in zip(self.data.arrays, self.data.doc_starts)]
            counts = [len(s) for s in self.starts]
        self.cumulative = np.cumsum(counts)
        if not len(self.cumulative) or self.cumulative[-1] == 0:
            raise ValueError(f"the {split} split ({self.data.num_tokens} tokens) is shorter than one window of "
                             f"{window} tokens: lower model.block_size or add data")

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch this rank trains on at `step` (a pure function of seed, step and rank)."""
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, self.cumulative[-1], size=self.batch_size * self.world_size)
        picks = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        which = np.searchsorted(self.cumulative, picks, side="right")
        local = picks - np.concatenate([[0], self.cumulative])[which]
        window = self.block_size + 1
        out = np.empty((self.batch_size, window), dtype=np.int64)
        for a in np.unique(which):  # one vectorized gather per memory-mapped array
            rows = np.nonzero(which == a)[0]
            starts = local[rows] if self.starts[a] is None else self.starts[a][local[rows]]
            out[rows] = self.data.arrays[a][starts[:, None] + np.arange(window)]
        batch = torch.from_numpy(out)
        return batch[:, :-1], batch[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            x, y = self.batch_at(self.step)
            self.step += 1
            yield x, y

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "world_size": self.world_size, "packing": self.packing}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["packing"] != self.packing:
            raise ValueError("loader state is from a run with another seed or packing mode")
        self.step = state["step"]


def sequential_batches(dataset_dir: Path, split: str, block_size: int, batch_size: int,
                       rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every token of the split predicted once (non-overlapping windows), for evaluation.
    Ranks take interleaved windows; together they cover the split exactly once."""
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
