"""llm_core.data.split: a document's side of the train/validation split depends on its id and the seed only;
a corpus of a few documents is split by piece instead."""

from pathlib import Path

import pytest

from helpers import write_parquet
from llm_core.config import load_config
from llm_core.errors import DataError
from llm_core.data.split import as_asked, is_validation, plan_split

IDS = [f"source.jsonl:{i}" for i in range(10_000)]


def validation_ids(ids: list[str], fraction: float, seed: int) -> set[str]:
    return {doc_id for doc_id in ids if is_validation(doc_id, fraction, seed)}


def test_adding_or_removing_documents_moves_no_other_document():
    before = validation_ids(IDS[:5_000], 0.1, seed=0)
    after = validation_ids(IDS[2_000:] + [f"new.txt:{i}" for i in range(3_000)], 0.1, seed=0)
    assert after & set(IDS[2_000:5_000]) == before & set(IDS[2_000:5_000])


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_the_fraction_is_honoured(fraction):
    share = len(validation_ids(IDS, fraction, seed=0)) / len(IDS)
    assert share == pytest.approx(fraction, abs=0.01)  # 3 standard deviations of a binomial at 0.5: 0.015


def test_fraction_zero_and_one_are_exact():
    assert not validation_ids(IDS, 0.0, seed=0)
    assert validation_ids(IDS, 1.0, seed=0) == set(IDS)


def test_the_seed_chooses_another_split_of_the_same_size():
    a, b = validation_ids(IDS, 0.1, seed=0), validation_ids(IDS, 0.1, seed=1)
    assert a != b and len(b) == pytest.approx(len(a), abs=100)
    assert len(a & b) / len(a) == pytest.approx(0.1, abs=0.03)  # independent: they share about a fraction of each other
    assert validation_ids(IDS, 0.1, seed=0) == a  # and the same seed the same split


# plan_split: by document when that holds out about the fraction of the bytes, else by piece.

def write_shard(path: Path, pieces: list[tuple[str, str, int]]) -> Path:
    """A cleaned shard of (piece id, doc id, bytes) pieces of plain text."""
    write_parquet(path, {"id": [p for p, _, _ in pieces], "doc_id": [d for _, d, _ in pieces],
                         "source": ["test"] * len(pieces), "text": ["x" * n for _, _, n in pieces]})
    return path


def profile(fraction: float = 0.1, seed: int = 1337):
    return load_config(overrides={"dataset": {"val_fraction": fraction, "seed": seed}})


def test_many_documents_split_by_document_with_the_keys_of_before(tmp_path):
    shard = write_shard(tmp_path / "a.parquet", [(f"d{i}", f"d{i}", 1000) for i in range(2000)])
    plan = plan_split(profile(), [shard])
    assert plan.split.unit == "document" and plan.reason.startswith("by document")
    assert plan.split.key == [0.1, 1337]  # the tokenized shards of a corpus split by document keep their keys
    assert {p for p in (f"d{i}" for i in range(2000)) if plan.split.is_validation(p, p)} == \
        validation_ids([f"d{i}" for i in range(2000)], 0.1, 1337)


def test_a_few_documents_that_hold_out_nothing_are_split_by_piece(tmp_path):
    # 5 documents of 4 pieces each; a seed for which no document falls in the 10% fraction.
    seed = next(s for s in range(1000) if not any(is_validation(f"doc{d}", 0.1, s) for d in range(5)))
    pieces = [(f"doc{d}#{p}", f"doc{d}", 2000 + 100 * p) for d in range(5) for p in range(4)]
    plan = plan_split(profile(seed=seed), [write_shard(tmp_path / "a.parquet", pieces)])
    assert plan.split.unit == "piece" and "would hold out 0.0% of the bytes" in plan.reason
    held = [p for p, d, _ in pieces if plan.split.is_validation(p, d)]
    assert 0 < len(held) < len(pieces) and set(held) == plan.split.val_pieces
    assert 0.05 <= plan.val_share <= 0.2 and as_asked(plan.val_bytes, plan.num_bytes, 0.1)
    assert plan.val_documents == len({d for p, d, _ in pieces if p in held}) and plan.train_documents == 5
    assert plan_split(profile(seed=seed), [tmp_path / "a.parquet"]).split == plan.split  # deterministic


def test_one_big_document_is_split_by_piece(tmp_path):
    pieces = [(f"book#{p}", "book", 8000) for p in range(30)]
    plan = plan_split(profile(), [write_shard(tmp_path / "a.parquet", pieces)])
    assert plan.split.unit == "piece" and len(plan.split.val_pieces) == 3  # 10% of 30 equal pieces


def test_a_single_piece_is_refused_with_the_next_step(tmp_path):
    with pytest.raises(DataError, match="too small to hold out validation text: 1 piece") as info:
        plan_split(profile(), [write_shard(tmp_path / "a.parquet", [("only", "only", 3000)])])
    assert "corpus.max_document_bytes" in info.value.next_step


def test_enough_documents_stay_split_by_document_even_when_the_bytes_are_uneven(tmp_path):
    ids = [f"d{i}" for i in range(20)]
    big = next(d for d in ids if is_validation(d, 0.5, 1337))  # a held-out document with most of the text
    pieces = [(d, d, 10_000 if d == big else 100) for d in ids]
    plan = plan_split(profile(0.5), [write_shard(tmp_path / "a.parquet", pieces)])
    assert plan.split.unit == "document" and not as_asked(plan.val_bytes, plan.num_bytes, 0.5)  # warned, not moved
