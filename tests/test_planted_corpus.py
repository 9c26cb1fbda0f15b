"""The data stages on an unseen corpus: ~300 real prose files (Python's reference docs, licences
and docstrings, never tinyshakespeare) with planted exact duplicates, near duplicates (word 5-gram
Jaccard 0.8-0.97) and broken files, through raw_corpus + cleaned_shards.
benchmarks/planted_corpus.py prints the same scores."""

import pytest

from benchmarks.make_corpus import text_pool
from benchmarks.planted_corpus import run

# Enough distinct prose for 300 files (~320 documents) in ~20 s on a new machine; every package of the
# benchmark's pool takes ~1 min (~2 min beside other tests).
PACKAGES = ("sqlalchemy", "networkx", "pandas", "mlflow", "dagster", "numpy", "matplotlib", "scipy")


@pytest.mark.slow
def test_planted_duplicates_removed_clean_prose_kept_broken_files_quarantined(tmp_path):
    r = run(tmp_path, n_files=300, seed=0, pool=text_pool(packages=PACKAGES))
    scores = r["scores"]
    assert scores["total"]["exact"] >= 20 and scores["total"]["near"] >= 20
    assert scores["found"]["exact"] == scores["total"]["exact"]  # every planted exact duplicate
    assert scores["found"]["near"] >= 0.9 * scores["total"]["near"]
    kept, total, problems, _ = r["originals"]
    assert kept / total >= 0.8, problems[:5]
    assert r["broken"] and all(ok for _, ok, _ in r["broken"]), [b for b in r["broken"] if not b[1]]
    assert r["invariant"], r["verify"]
    assert not scores["unplanted_removals"] or len(scores["unplanted_removals"]) <= 2  # natural near dups only
