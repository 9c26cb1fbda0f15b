"""The train/validation split: by source document, or by piece when documents are too few.

By document (the rule for any corpus of many documents): a document's side is a pure function of
its id and the seed (a hash compared with the fraction), so it never changes when other documents
are added or removed, and the tokenizer (which must not train on validation text) and the dataset
agree without sharing state. All pieces of a document land on the same side.

A handful of files cannot be split that way: 5 documents at a 10% fraction often give no
validation document at all, or one document holding most of the text. When fewer than
ENOUGH_DOCUMENTS documents are expected on the validation side and the document split holds out
less than half or more than twice the requested share of the bytes, the split is made by piece
instead (pieces are cut at paragraph boundaries, corpus.max_document_bytes, so held-out text never
overlaps training text): pieces in the order of their seeded hash are held out until the
requested share of bytes is reached. `plan_split` decides once per corpus, from the cleaned shards,
and says why; `Split.is_validation` is what every stage asks.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pyarrow.compute as pc
import xxhash

from llm_core.data.shards import iter_batches
from llm_core.errors import DataError
from llm_core.files import short_hash

_SCALE = float(2**64)
# A split is "as asked" when it holds out between half and twice the requested share of the bytes.
TOLERANCE = 2.0
# With this many documents expected on the validation side, a document split stays one even when its
# share of the bytes is off (it warns): only a handful of documents is split by piece.
ENOUGH_DOCUMENTS = 5


def is_validation(doc_id: str, fraction: float, seed: int) -> bool:
    return _unit_hash(doc_id, seed) < fraction


def _unit_hash(unit_id: str, seed: int) -> float:
    return xxhash.xxh3_64_intdigest(unit_id.encode(), seed=seed) / _SCALE


@dataclasses.dataclass(frozen=True)
class Split:
    """Which pieces are held out: by document hash, or (unit "piece") the listed piece ids."""

    fraction: float
    seed: int
    unit: str = "document"  # or "piece"
    val_pieces: frozenset[str] = frozenset()

    def is_validation(self, piece_id: str, doc_id: str) -> bool:
        if self.unit == "document":
            return is_validation(doc_id, self.fraction, self.seed)
        return piece_id in self.val_pieces

    @property
    def key(self) -> list:
        """What the split depends on, for cache keys (a document split's key is what it always was)."""
        by_piece = [short_hash(sorted(self.val_pieces))] if self.unit == "piece" else []
        return [self.fraction, self.seed, *by_piece]


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    split: Split
    reason: str  # why this unit, with the numbers
    num_documents: int
    num_pieces: int
    num_bytes: int
    val_bytes: int
    train_documents: int  # source documents with a piece on that side (by piece, a document may be on both)
    val_documents: int

    @property
    def val_share(self) -> float:
        return self.val_bytes / max(self.num_bytes, 1)


def as_asked(val_bytes: int, total: int, fraction: float) -> bool:
    """Both sides hold text, and the held-out share of bytes is within TOLERANCE of the fraction."""
    share = val_bytes / max(total, 1)
    return 0 < val_bytes < total and fraction / TOLERANCE <= share <= min(fraction * TOLERANCE, (1 + fraction) / 2)


def _pieces(shards: tuple[tuple[Path, int, int], ...]) -> list[tuple[str, str, int]]:
    """(piece id, doc id, bytes) of every piece of the shards ((path, mtime, size) each)."""
    rows = []
    for shard, _, _ in shards:
        for batch in iter_batches(shard, ["id", "doc_id", "text"], batch_size=8192):
            sizes = pc.binary_length(batch.column(2)).to_pylist()
            rows += zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), sizes)
    return rows


def _hold_out_pieces(pieces: list[tuple[str, str, int]], fraction: float, seed: int) -> frozenset[str]:
    """Pieces in seeded hash order, each held out while at least half of it fits under the target."""
    target = fraction * sum(size for _, _, size in pieces)
    held, held_bytes = [], 0
    for piece_id, _, size in sorted(pieces, key=lambda p: _unit_hash(p[0], seed)):
        if held_bytes + size / 2 <= target:
            held.append(piece_id)
            held_bytes += size
    if not held:  # every piece is larger than twice the target: the smallest one
        held = [min(pieces, key=lambda p: (p[2], _unit_hash(p[0], seed)))[0]]
    return frozenset(held)


def plan_split(cfg, shards: list[Path]) -> SplitPlan:
    """The split of the pieces in `shards` (the cleaned shards, in corpus order) by the profile's
    dataset.val_fraction and seed: by document when that holds out about the requested share of
    bytes, else by piece; a DataError when even that cannot hold out anything (a single piece).
    Read once per process for the same shard files."""
    stats = tuple((path, path.stat().st_mtime_ns, path.stat().st_size) for path in shards)
    return _plan(stats, cfg.dataset.val_fraction, cfg.dataset.seed, cfg.corpus.max_document_bytes)


@functools.lru_cache(maxsize=4)
def _plan(shards: tuple[tuple[Path, int, int], ...], fraction: float, seed: int, max_document_bytes: int) -> SplitPlan:
    pieces = _pieces(shards)
    total = sum(size for _, _, size in pieces)
    documents = {doc_id for _, doc_id, _ in pieces}
    by_document = Split(fraction, seed)
    doc_val = sum(size for piece_id, doc_id, size in pieces if by_document.is_validation(piece_id, doc_id))
    asked = f"dataset.val_fraction {fraction:g}"
    enough = fraction * len(documents) >= ENOUGH_DOCUMENTS and 0 < doc_val < total
    if enough or as_asked(doc_val, total, fraction):
        return _made(by_document, f"by document: {_share(doc_val, total)} of the bytes held out ({asked})", pieces)
    if len(pieces) < 2:
        raise DataError(
            f"the corpus is too small to hold out validation text: {len(pieces)} piece "
            f"({total / 1e3:.1f} KB) after cleaning",
            next_step=f"add text to corpus.sources, or cut documents finer with a smaller corpus.max_document_bytes "
                      f"(now {max_document_bytes})")
    by_piece = Split(fraction, seed, "piece", _hold_out_pieces(pieces, fraction, seed))
    piece_val = sum(size for piece_id, _, size in pieces if piece_id in by_piece.val_pieces)
    return _made(by_piece, f"by piece: the {len(documents)} documents split whole would hold out "
                           f"{_share(doc_val, total)} of the bytes ({asked}), so pieces of documents are held "
                           f"out instead ({_share(piece_val, total)} of the bytes)", pieces)


def _made(split: Split, reason: str, pieces: list[tuple[str, str, int]]) -> SplitPlan:
    sides = {True: set(), False: set()}
    val_bytes = 0
    for piece_id, doc_id, size in pieces:
        held = split.is_validation(piece_id, doc_id)
        sides[held].add(doc_id)
        val_bytes += size * held
    return SplitPlan(split, reason, num_documents=len(sides[True] | sides[False]), num_pieces=len(pieces),
                     num_bytes=sum(size for _, _, size in pieces), val_bytes=val_bytes,
                     train_documents=len(sides[False]), val_documents=len(sides[True]))


def _share(part: int, total: int) -> str:
    return f"{100 * part / max(total, 1):.1f}%"
