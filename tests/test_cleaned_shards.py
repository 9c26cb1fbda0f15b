"""build_cleaned_shards on a small generated corpus: accounting, the removed-docs ledger, caching."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from helpers import QUIET, rows, write_jsonl

from llm_core.data import clean
from llm_core.data.checks import verify_cleaned_shards
from llm_core.data.cleaned_shards import build_cleaned_shards
from llm_core.data.raw_corpus import EmptyCorpusError, build_raw_corpus, raw_parts


@pytest.fixture
def corpus(tmp_path, prose):
    """Three source files with planted exact duplicates, a near duplicate, junk and PII.

    Returns (source dir, {label: text}) for the planted documents."""
    src = tmp_path / "src"
    src.mkdir()
    long = [p for p in prose if len(p.split()) >= 80]
    near_base = long[0]
    words = near_base.split()
    words[len(words) // 2] = "zebra"  # one word changed: word-5-gram Jaccard ~0.9
    planted = {
        "dup_base": prose[2],
        "exact_dup": "  " + prose[2].upper().replace(" ", "   ") + "\n",
        "near_base": near_base,
        "near_dup": " ".join(words),
        "inner_base": prose[17],
        "inner_dup": prose[17].replace(". ", ".\n"),
        "short": "Too short to be a document.",
        "numbers": " ".join(f"{w} {1000 + i}" for i, w in enumerate(prose[20].split()[:60])),
        "pii": prose[22] + " Contact jane.doe@example.com or call 555-123-4567 for details.",
    }
    others = [p for p in prose[:30] if p not in (prose[2], near_base, prose[17], prose[22])]
    write_jsonl(src / "f0.jsonl", [planted["dup_base"], planted["near_base"]] + others[:6])
    write_jsonl(src / "f1.jsonl", others[6:13] + [planted["exact_dup"], planted["near_dup"]])
    write_jsonl(src / "f2.jsonl", [planted["inner_base"], planted["short"]] + others[13:18]
                + [planted["inner_dup"], planted["numbers"], planted["pii"]] + others[18:22])
    return src, planted


@pytest.fixture
def cfg_for(make_cfg):
    def make(src, **sections):
        return make_cfg([src], corpus={"shard_size_mb": 0.004, **sections.pop("corpus", {})}, **sections)
    return make


def ids_by_text(cfg) -> dict[str, str]:
    return {r["text"]: r["id"] for p in raw_parts(cfg) for r in pq.read_table(p).to_pylist()}


def test_cleaned_shards_account_for_every_document(corpus, cfg_for):
    src, planted = corpus
    cfg = cfg_for(src)
    raw = build_raw_corpus(cfg, QUIET)
    assert len(raw.parts) >= 4  # several raw parts: duplicates are found across parts
    result = build_cleaned_shards(cfg, QUIET)

    assert result.num_documents_in == raw.num_documents
    assert result.invariant_holds()
    assert result.num_documents_in == (result.num_kept + result.num_filtered + result.num_exact_duplicates
                                       + result.num_near_duplicates + result.num_quarantined)
    assert (result.num_exact_duplicates, result.num_near_duplicates, result.num_quarantined) == (2, 1, 0)
    assert result.filtered_by_rule == {"min_chars": 1, "min_alpha_word_fraction": 1}
    assert result.num_filtered == 2 and result.num_kept == raw.num_documents - 5
    assert result.pii_replacements == {"email": 1, "phone": 1}
    assert result.num_parts_cleaned == len(raw.parts) and result.num_parts_reused == 0
    assert result.num_shards_written == len(raw.parts) == len(result.parts)
    ok, message = verify_cleaned_shards(cfg)
    assert ok, message

    # the ledger: every removed doc, with its reason, and what it duplicates
    ids = ids_by_text(cfg)
    ledger = {r["id"]: (r["reason"], r["duplicate_of"]) for r in rows(result.shards_dir.parent / "removed")}
    assert ledger == {
        ids[planted["exact_dup"]]: ("exact_duplicate", ids[planted["dup_base"]]),
        ids[planted["inner_dup"]]: ("exact_duplicate", ids[planted["inner_base"]]),
        ids[planted["near_dup"]]: ("near_duplicate", ids[planted["near_base"]]),
        ids[planted["short"]]: ("min_chars", None),
        ids[planted["numbers"]]: ("min_alpha_word_fraction", None),
    }
    kept = rows(result.shards_dir)
    assert len(kept) == result.num_kept
    assert {r["id"] for r in kept} == set(ids.values()) - set(ledger)
    # kept text is the normalized, scrubbed text; the first of every duplicate group is the one kept
    kept_text = {r["id"]: r["text"] for r in kept}
    assert kept_text[ids[planted["dup_base"]]] == clean.normalize(planted["dup_base"])
    assert kept_text[ids[planted["pii"]]].endswith("Contact <EMAIL> or call <PHONE> for details.")
    assert all(r["source"].endswith(".jsonl") for r in kept)
    assert 0 < len(result.preview) <= 5 and result.num_bytes_out < result.num_bytes_in


def test_rerun_reuses_the_cache_and_writes_nothing(corpus, cfg_for):
    src, _ = corpus
    cfg = cfg_for(src)
    build_raw_corpus(cfg, QUIET)
    first = build_cleaned_shards(cfg, QUIET)
    mtimes = {p: p.stat().st_mtime_ns for p in first.shards_dir.glob("*.parquet")}

    again = build_cleaned_shards(cfg_for(src, cleaning={"num_workers": 2}), QUIET)  # workers are not in the key
    assert again.num_parts_cleaned == 0 and again.num_parts_reused == len(first.parts)
    assert again.num_shards_written == 0
    assert again.data_version == first.data_version
    assert (again.num_kept, again.num_exact_duplicates, again.num_near_duplicates, again.filtered_by_rule) == \
        (first.num_kept, first.num_exact_duplicates, first.num_near_duplicates, first.filtered_by_rule)
    assert again.pii_replacements == first.pii_replacements  # carried over from the run that cleaned
    assert {p: p.stat().st_mtime_ns for p in again.shards_dir.glob("*.parquet")} == mtimes
    assert verify_cleaned_shards(cfg)[0]


def test_changing_a_cleaning_setting_recleans(corpus, cfg_for):
    src, planted = corpus
    cfg = cfg_for(src)
    build_raw_corpus(cfg, QUIET)
    first = build_cleaned_shards(cfg, QUIET)

    changed = cfg_for(src, cleaning={"scrub_pii": False, "num_workers": 2})  # also exercises the process pool
    result = build_cleaned_shards(changed, QUIET)
    assert result.num_parts_cleaned == len(first.parts) and result.num_parts_reused == 0
    assert result.pii_replacements == {} and result.data_version != first.data_version
    assert result.invariant_holds() and verify_cleaned_shards(changed)[0]
    assert any("jane.doe@example.com" in r["text"] for r in rows(result.shards_dir))
    # only the cache of the current config is kept
    cache = first.shards_dir.parent / "cache"
    assert {p.name.rsplit("-", 1)[-1].split(".")[0] for p in cache.iterdir()} == \
        {result.parts[0]["cache"].rsplit("-", 1)[-1]}


def test_changing_a_dedup_setting_reuses_the_cleaning(corpus, cfg_for):
    src, _ = corpus
    cfg = cfg_for(src)
    build_raw_corpus(cfg, QUIET)
    first = build_cleaned_shards(cfg, QUIET)

    no_exact = cfg_for(src, dedup={"exact": False})
    result = build_cleaned_shards(no_exact, QUIET)
    assert result.num_parts_cleaned == 0  # exact/near are corpus-wide decisions over the cached hashes
    assert result.num_exact_duplicates == 0 and result.num_near_duplicates == 3  # exact dups are near dups too
    assert result.num_kept == first.num_kept and result.invariant_holds()
    assert 0 < result.num_shards_written < len(result.parts)  # only the shards whose removed set changed
    assert verify_cleaned_shards(no_exact)[0]

    no_dedup = cfg_for(src, dedup={"exact": False, "near": False})
    result = build_cleaned_shards(no_dedup, QUIET)
    assert result.num_exact_duplicates == result.num_near_duplicates == 0
    assert result.num_kept == first.num_kept + 3 and result.num_candidates_checked == 0


def test_new_source_file_cleans_only_its_parts(corpus, cfg_for, prose):
    src, planted = corpus
    cfg = cfg_for(src)
    build_raw_corpus(cfg, QUIET)
    first = build_cleaned_shards(cfg, QUIET)

    write_jsonl(src / "f3.jsonl", prose[40:46] + [planted["dup_base"]])
    raw = build_raw_corpus(cfg, QUIET)
    assert raw.num_shards_built == 1
    new_parts = len(raw.parts) - len(first.parts)
    result = build_cleaned_shards(cfg, QUIET)
    assert result.num_parts_cleaned == new_parts and result.num_parts_reused == len(first.parts)
    assert result.num_shards_written == new_parts  # the old shards' kept sets did not change
    assert result.num_exact_duplicates == first.num_exact_duplicates + 1
    assert result.num_kept == first.num_kept + 6
    assert result.invariant_holds() and verify_cleaned_shards(cfg)[0]


def test_verify_detects_a_tampered_shard(corpus, cfg_for):
    src, _ = corpus
    cfg = cfg_for(src)
    build_raw_corpus(cfg, QUIET)
    result = build_cleaned_shards(cfg, QUIET)
    shard = result.shards_dir / result.parts[0]["name"]
    table = pq.read_table(shard)
    pq.write_table(table.slice(1), shard)
    ok, message = verify_cleaned_shards(cfg)
    assert not ok and result.parts[0]["name"] in message


def test_cleaning_that_keeps_nothing_raises(corpus, cfg_for):
    src, _ = corpus
    cfg = cfg_for(src, cleaning={"min_chars": 100_000})
    build_raw_corpus(cfg, QUIET)
    with pytest.raises(EmptyCorpusError, match="cleaning kept no document"):
        build_cleaned_shards(cfg, QUIET)


def test_cleaned_shards_before_raw_corpus_is_a_clear_error(corpus, cfg_for):
    with pytest.raises(FileNotFoundError, match="raw_corpus has not been materialized"):
        build_cleaned_shards(cfg_for(corpus[0]), QUIET)
