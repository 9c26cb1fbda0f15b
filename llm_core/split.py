"""The train/validation split, by document.

A document's side is a pure function of its id and the seed (a hash compared with the fraction),
so it never changes when other documents are added or removed: incremental runs, the tokenizer
(which must not train on validation text) and the dataset all agree without sharing state.
"""

import xxhash

_SCALE = float(2**64)


def is_validation(doc_id: str, fraction: float, seed: int) -> bool:
    return xxhash.xxh3_64_intdigest(doc_id.encode(), seed=seed) / _SCALE < fraction
