"""llm_core.split: a document's side of the train/validation split depends on its id and the seed only."""

import pytest

from llm_core.split import is_validation

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
