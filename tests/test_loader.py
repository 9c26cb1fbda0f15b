"""TokenWindows and sequential_batches on a real tokenized dataset (tiny Shakespeare slice, many small
shards): shapes, determinism, rank slicing, exact resume, document packing, shard boundaries, and
exact coverage of the validation split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from llm_core.config import DEFAULT_PROFILE, PROJECT_ROOT, load_config
from llm_core.data.cleaned_shards import build_cleaned_shards
from llm_core.data.raw_corpus import build_raw_corpus
from llm_core.training.loader import TokenSplit, TokenWindows, sequential_batches
from llm_core.data.tokenized_dataset import build_tokenized_dataset
from llm_core.data.tokenizer import load_tokenizer, train_tokenizer

QUIET = lambda msg: None  # noqa: E731
BLOCK, BATCH = 256, 8


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    src = root / "src"
    src.mkdir()
    text = (PROJECT_ROOT / "data" / "tinyshakespeare.txt").read_text()
    (src / "shakespeare.txt").write_text(text[:300_000])
    cfg = load_config(DEFAULT_PROFILE, overrides={
        "data_dir": str(root / "run"), "corpus": {"sources": [str(src)], "shard_size_mb": 0.004,
                                                  "max_document_bytes": 2048, "pieces_are_documents": [str(src)]},
        "cleaning": {"num_workers": 1}, "tokenizer": {"vocab_size": 300}, "dataset": {"val_fraction": 0.2}})
    build_raw_corpus(cfg, QUIET)
    cleaned = build_cleaned_shards(cfg, QUIET)
    shards = [cleaned.shards_dir / p["name"] for p in cleaned.parts]
    train_tokenizer(cfg, shards, root / "tokenizer", log=QUIET)
    result = build_tokenized_dataset(cfg, load_tokenizer(root / "tokenizer"), root / "tokenizer", log=QUIET)
    assert result.num_train_tokens > 50_000 and result.num_val_tokens > 5_000
    return result.out_dir


def windows(dataset_dir, **kw) -> TokenWindows:
    args = {"split": "train", "block_size": BLOCK, "batch_size": BATCH, "seed": 7} | kw
    return TokenWindows(dataset_dir, **args)


def locate(data: TokenSplit, window: np.ndarray) -> list[tuple[int, int]]:
    """Every (array, start) where `window` appears contiguously inside one token array."""
    n = len(window)
    found = []
    for a, array in enumerate(data.arrays):
        if len(array) < n:
            continue
        view = sliding_window_view(array, n)
        candidates = np.flatnonzero((view[:, 0] == window[0]) & (view[:, 1] == window[1]) & (view[:, 2] == window[2]))
        found += [(a, int(s)) for s in candidates if np.array_equal(view[s], window)]
    return found


def rows_of(x: torch.Tensor, y: torch.Tensor) -> list[np.ndarray]:
    return [np.concatenate([xr.numpy(), yr[-1:].numpy()]) for xr, yr in zip(x, y)]


def test_dataset_has_many_small_shards(dataset_dir):
    data = TokenSplit(dataset_dir, "train")
    assert len(data.arrays) >= 10
    assert data.dtype == np.uint16 and all(a.dtype == np.uint16 for a in data.arrays)
    # Arrays are short: were windows drawn over the concatenated split, >= 5% of them would cross a
    # boundary, so the 96 windows checked per mode below would almost surely include one.
    assert len(data.arrays) * BLOCK >= 0.05 * data.num_tokens


@pytest.mark.parametrize("packing", ["random", "document"])
def test_batches_shape_shift_and_come_from_one_array(dataset_dir, packing):
    loader = windows(dataset_dir, packing=packing)
    data = loader.data
    located = 0
    for step in range(12):
        x, y = loader.batch_at(step)
        assert x.shape == y.shape == (BATCH, BLOCK) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        assert int(x.max()) < data.vocab_size and int(x.min()) >= 0
        for row in rows_of(x, y):
            places = locate(data, row)
            # Never across a shard file boundary: the whole window lies inside one array.
            assert places, "window not found inside any single token file"
            if packing == "document":
                for a, start in places:
                    assert start == 0 or data.arrays[a][start - 1] == data.eot_id
                    assert start in set(data.doc_starts[a].tolist())
            located += 1
    assert located == 12 * BATCH


def test_deterministic_per_seed_and_step(dataset_dir):
    a, b = windows(dataset_dir), windows(dataset_dir)
    for step in (0, 1, 17):
        assert all(torch.equal(u, v) for u, v in zip(a.batch_at(step), b.batch_at(step)))
    assert not torch.equal(a.batch_at(0)[0], a.batch_at(1)[0])
    other = windows(dataset_dir, seed=8)
    assert not torch.equal(a.batch_at(0)[0], other.batch_at(0)[0])


@pytest.mark.parametrize("packing", ["random", "document"])
def test_two_ranks_together_equal_one_rank(dataset_dir, packing):
    whole = windows(dataset_dir, batch_size=8, packing=packing)
    ranks = [windows(dataset_dir, batch_size=4, rank=r, world_size=2, packing=packing) for r in (0, 1)]
    for step in range(5):
        x, y = whole.batch_at(step)
        parts = [r.batch_at(step) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not torch.equal(parts[0][0], parts[1][0])


def test_bad_rank_or_packing_is_refused(dataset_dir):
    with pytest.raises(ValueError, match="rank"):
        windows(dataset_dir, rank=2, world_size=2)
    with pytest.raises(ValueError, match="packing"):
        windows(dataset_dir, packing="sequential")


@pytest.mark.parametrize("packing", ["random", "document"])
def test_resume_in_a_new_loader_continues_exactly(dataset_dir, packing):
    k, more = 4, 5
    uninterrupted = iter(windows(dataset_dir, packing=packing))
    expected = [next(uninterrupted) for _ in range(k + more)][k:]

    first = windows(dataset_dir, packing=packing)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would store
    assert state["step"] == k

    resumed = windows(dataset_dir, packing=packing)
    resumed.load_state_dict(state)
    it = iter(resumed)
    got = [next(it) for _ in range(more)]
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert resumed.step == k + more

    with pytest.raises(ValueError, match="seed"):
        windows(dataset_dir, packing=packing, seed=99).load_state_dict(state)


def test_sequential_batches_cover_the_split_exactly_once(dataset_dir):
    data = TokenSplit(dataset_dir, "val")
    block, batch = 64, 4
    counts = np.zeros(data.vocab_size, dtype=np.int64)
    predicted = 0
    for rank in (0, 1):
        for x, y in sequential_batches(dataset_dir, "val", block, batch, rank=rank, world_size=2):
            assert x.shape == y.shape and x.shape[1] == block and x.shape[0] <= batch
            mask = y != -100
            # inside a row, targets are the inputs shifted by one
            assert torch.equal(x[:, 1:][mask[:, :-1] & mask[:, 1:]], y[:, :-1][mask[:, :-1] & mask[:, 1:]])
            predicted += int(mask.sum())
            counts += np.bincount(y[mask].numpy(), minlength=data.vocab_size)
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    num_val = sum(e["val"]["tokens"] for e in manifest["shards"])
    assert data.num_tokens == num_val
    assert predicted == num_val - len(data.arrays)  # every token but each array's first, once
    expected = sum(np.bincount(a[1:].astype(np.int64), minlength=data.vocab_size) for a in data.arrays)
    assert np.array_equal(counts, expected)


def test_sequential_ranks_are_disjoint(dataset_dir):
    def rows(rank):
        return [tuple(r.tolist()) for x, _ in sequential_batches(dataset_dir, "val", 64, 4, rank, 2) for r in x]
    r0, r1, single = rows(0), rows(1), [tuple(r.tolist()) for x, _ in sequential_batches(dataset_dir, "val", 64, 4)
                                        for r in x]
    assert len(r0) + len(r1) == len(single)
    assert sorted(r0 + r1) == sorted(single)


@pytest.mark.parametrize("packing", ["random", "document"])
def test_split_shorter_than_a_window_is_a_clear_error(dataset_dir, packing):
    longest = max(len(a) for a in TokenSplit(dataset_dir, "val").arrays)
    with pytest.raises(ValueError, match="block_size"):
        windows(dataset_dir, split="val", block_size=longest, packing=packing)


def test_manifest_dtype_mismatch_is_refused(dataset_dir, tmp_path):
    copy = tmp_path / "tokenized_dataset"
    shutil.copytree(dataset_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "dtype": "uint32"}))
    with pytest.raises(ValueError, match="uint32"):
        TokenSplit(copy, "train")
    with pytest.raises(ValueError, match="uint32"):
        windows(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "dtype": "uint8"}))
    with pytest.raises(ValueError, match="cannot hold"):
        TokenSplit(copy, "train")


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenized_dataset"):
        TokenSplit(tmp_path, "train")
