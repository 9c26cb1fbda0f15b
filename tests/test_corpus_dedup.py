"""The corpus-wide dedup of cleaned_shards: it decides as one in-memory pass would, and it judges whole
source documents (a long document cut into pieces is removed with all its pieces)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from helpers import QUIET, rows, write_jsonl

from llm_core.data import dedup
from llm_core.data.checks import verify_cleaned_shards
from llm_core.data.cleaned_shards import _cache_files, build_cleaned_shards
from llm_core.data.corpus_dedup import CorpusDedup
from llm_core.data.sharded_dedup import ShardedDedup
from llm_core.data.raw_corpus import build_raw_corpus, raw_parts
from llm_core.data.engine import LocalEngine


def single_pass_removals(cfg) -> tuple[dict[str, tuple[str, str | None]], int]:
    """{id: (reason, duplicate_of)} of every removed piece and the number of candidates checked, as
    the original single pass decided them: every content hash in a dict, every document's band keys and
    signature in the NearDupIndex. The reference for the stage's three-pass dedup."""
    root = cfg.data_path / "cleaned_shards"
    entries = json.loads((root / "manifest.json").read_text())["parts"]
    shingles: list[np.ndarray] = []  # per ref
    index = dedup.NearDupIndex(cfg.dedup, lambda ref: shingles[ref])
    first_with_hash: dict[int, str] = {}
    id_of_ref: list[str] = []
    removed: dict[str, tuple[str, str | None]] = {}
    for entry in entries:
        files = _cache_files(root / "cache" / entry["cache"])
        signatures, all_shingles, offsets = (np.load(files[name]) for name in ("signatures", "shingles", "offsets"))
        decided: dict[int, tuple[str, str]] = {}  # the part's duplicate documents (units)
        for k, unit in enumerate(pq.read_table(files["units"]).to_pylist()):
            if cfg.dedup.exact and unit["content_hash"] in first_with_hash:
                decided[k] = ("exact_duplicate", first_with_hash[unit["content_hash"]])
                continue
            first_with_hash.setdefault(unit["content_hash"], unit["doc_id"])
            if cfg.dedup.near:
                shingles.append(all_shingles[offsets[k]: offsets[k + 1]])
                id_of_ref.append(unit["doc_id"])
                match = index.find_or_add(len(shingles) - 1, signatures[k], shingles[-1])
                if match is not None:
                    decided[k] = ("near_duplicate", id_of_ref[match])
        for row in pq.read_table(files["table"], columns=["id", "status", "unit"]).to_pylist():
            if row["status"] != "kept":
                removed[row["id"]] = (row["status"], None)
            elif row["unit"] in decided:
                removed[row["id"]] = decided[row["unit"]]
    return removed, index.num_candidates_checked


def test_dedup_decides_exactly_as_the_single_in_memory_pass(tmp_path, make_cfg):
    """The stage remembers only repeated hashes and band keys; it must remove the same documents for the
    same reasons, on a corpus with duplicates across parts and chains of near duplicates."""
    from benchmarks.make_corpus import exact_variant, make_sized_corpus, near_variant, text_pool

    make_sized_corpus(tmp_path / "gen", 3, dup_rate=0.3, seed=5, pool=text_pool(tmp_path, packages=()))
    src = tmp_path / "gen" / "corpus"
    # Chains: v1 near base, v2 near v1 (maybe not near base), an exact copy of v1 (removed as a near dup
    # itself: its hash still counts), v4 near v2.
    rng = random.Random(5)
    vocab = sorted({w.lower() for p in sorted(src.glob("txt/*/*.txt"))[:50] for w in p.read_text().split()
                    if w.isalpha()})
    chains = []
    for base in sorted(src.glob("txt/*/*.txt"))[:40]:
        v1 = near_variant(base.read_text(), vocab, rng, 0.8, 0.9)
        v2 = v1 and near_variant(v1[0], vocab, rng, 0.8, 0.9)
        v4 = v2 and near_variant(v2[0], vocab, rng, 0.8, 0.9)
        if v4:
            chains += [v1[0], v2[0], exact_variant(v1[0], "uppercase"), v4[0]]
    write_jsonl(src / "zz-chains.jsonl", chains)

    base = make_cfg([src], corpus={"shard_size_mb": 0.25})
    raw = build_raw_corpus(base, QUIET)
    assert len(raw.parts) >= 10
    reasons = Counter()
    for dedup_cfg in ({}, {"threshold": 0.5, "bands": 64}, {"exact": False}, {"near": False}):
        cfg = make_cfg([src], corpus={"shard_size_mb": 0.25}, dedup=dedup_cfg)
        result = build_cleaned_shards(cfg, QUIET)
        ledger = {r["id"]: (r["reason"], r["duplicate_of"]) for r in rows(result.shards_dir.parent / "removed")}
        expected, candidates = single_pass_removals(cfg)
        assert ledger == expected, dedup_cfg
        assert result.num_candidates_checked == candidates
        assert_sharded_dedup_decides_the_same(cfg)
        reasons.update(reason for reason, _ in ledger.values())
        # the subtle case is there: the content hash of a doc removed as a near dup still counts
        reasons["exact of near"] += sum(r == "exact_duplicate" and ledger.get(of, ("",))[0] == "near_duplicate"
                                        for r, of in ledger.values())
    assert reasons["exact_duplicate"] > 100 and reasons["near_duplicate"] > 100 and reasons["exact of near"] >= 20


def assert_sharded_dedup_decides_the_same(cfg) -> None:
    """The partitioned shuffle of the Ray engine (sharded_dedup.py), run here by the local engine, removes
    the same units for the same reasons and checks the same candidates as the streaming pass."""
    root = cfg.data_path / "cleaned_shards"
    entries = json.loads((root / "manifest.json").read_text())["parts"]
    caches = [_cache_files(root / "cache" / entry["cache"]) for entry in entries]
    streaming = CorpusDedup(cfg.dedup, caches, root)
    expected = list(streaming.removed_units())
    sharded = ShardedDedup(cfg.dedup, caches, root, LocalEngine(QUIET), QUIET)
    assert sharded.removed_units == expected
    assert sharded.num_candidates_checked == streaming.num_candidates_checked
    assert not list(root.glob("dedup.tmp-*"))  # partitions removed


# ----------------------------------------------------------------------------------------------
# Whole documents: a source document longer than max_document_bytes is cut into pieces (rows), but
# dedup judges the whole document and removes it with all its pieces.


def pieces_of(text: str, limit: int) -> list[str]:
    """The pieces raw_corpus cuts a .txt document into."""
    from llm_core.data.ingest import split_pieces

    return [p.decode() for p, _ in split_pieces(text.encode(), None, limit, final=True)[0]]


def word_jaccard(a: str, b: str, n: int = 5) -> float:
    """Word n-gram Jaccard, computed independently of the module, on Python tuples."""
    wa, wb = a.lower().split(), b.lower().split()
    sa = {tuple(wa[i:i + n]) for i in range(len(wa) - n + 1)}
    sb = {tuple(wb[i:i + n]) for i in range(len(wb) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def reversed_words(text: str, every: int) -> str:
    """Every `every`-th word spelled backwards: other 5-grams, but the same bytes and lines, so a copy
    made this way is cut into pieces at the same places as the original."""
    words = text.split(" ")
    return " ".join(w[::-1] if i % every == every - 1 else w for i, w in enumerate(words))


def by_source(cfg) -> dict[str, list[dict]]:
    """File name -> its raw rows (pieces), in order."""
    out: dict[str, list[dict]] = {}
    for part in raw_parts(cfg):
        for r in pq.read_table(part).to_pylist():
            out.setdefault(Path(r["source"]).name, []).append(r)
    return out


def clean_long_pair(cfg):
    """Both data stages; (result, the raw pieces by source file, kept ids, {removed id: (reason, of)})."""
    build_raw_corpus(cfg, QUIET)
    result = build_cleaned_shards(cfg, QUIET)
    kept_ids = {r["id"] for r in rows(result.shards_dir)}
    ledger = {r["id"]: (r["reason"], r["duplicate_of"]) for r in rows(result.shards_dir.parent / "removed")}
    return result, by_source(cfg), kept_ids, ledger


def write_long_pair(src: Path, original: str, copy: str, prose: list[str]) -> None:
    """a_original.txt, then b_copy.txt (later in corpus order), and unrelated one-paragraph files."""
    src.mkdir()
    (src / "a_original.txt").write_text(original)
    (src / "b_copy.txt").write_text(copy)
    for i, paragraph in enumerate(prose[150:170]):
        (src / f"c_{i:02d}.txt").write_text(paragraph)


def test_a_near_duplicate_long_document_is_removed_whole(tmp_path, prose, make_cfg):
    cfg = make_cfg([tmp_path / "src"], corpus={"shard_size_mb": 0.01})
    limit = cfg.corpus.max_document_bytes
    original = "\n\n".join(prose[:60]) + "\n"
    pieces = pieces_of(original, limit)
    # Lightly edited throughout, heavily in the second piece.
    copy = "".join(reversed_words(p, 25 if k == 1 else 150) for k, p in enumerate(pieces))
    copy_pieces = pieces_of(copy, limit)
    assert len(original.encode()) > 3 * limit and len(pieces) == len(copy_pieces) >= 4
    whole = word_jaccard(original, copy)
    piecewise = [word_jaccard(a, b) for a, b in zip(pieces, copy_pieces)]
    assert 0.84 <= whole <= 0.87  # a near duplicate as a whole document...
    assert min(piecewise) < cfg.dedup.threshold - 0.1  # ...but judged piece by piece, one pair is not
    write_long_pair(tmp_path / "src", original, copy, prose)

    result, raw, kept_ids, ledger = clean_long_pair(cfg)
    original_id = raw["a_original.txt"][0]["id"]  # the id of a document is that of its first piece
    assert len(raw["a_original.txt"]) == len(raw["b_copy.txt"]) == len(pieces)
    assert all(r["id"] in kept_ids for r in raw["a_original.txt"])  # the first in corpus order is kept, whole
    assert [ledger.get(r["id"]) for r in raw["b_copy.txt"]] == [("near_duplicate", original_id)] * len(pieces)
    assert all(r["id"] in kept_ids for name, rs in raw.items() if name.startswith("c_") for r in rs)
    assert (result.num_near_duplicates, result.num_exact_duplicates) == (len(pieces), 0)  # counts are pieces
    assert result.invariant_holds()
    ok, message = verify_cleaned_shards(cfg)
    assert ok, message


def test_an_exact_duplicate_long_document_is_removed_whole_even_when_cut_elsewhere(tmp_path, prose, make_cfg):
    cfg = make_cfg([tmp_path / "src"], corpus={"shard_size_mb": 0.01})
    limit = cfg.corpus.max_document_bytes
    original = "\n\n".join(prose[60:120]) + "\n"
    copy = original.upper().replace(". ", ".   ")  # the same words: an exact duplicate modulo case and spaces
    pieces, copy_pieces = pieces_of(original, limit), pieces_of(copy, limit)
    assert len(pieces) >= 3 and len(copy_pieces) >= 3
    assert [p.lower().split() for p in pieces] != [p.lower().split() for p in copy_pieces]  # cut elsewhere
    write_long_pair(tmp_path / "src", original, copy, prose)

    result, raw, kept_ids, ledger = clean_long_pair(cfg)
    original_id = raw["a_original.txt"][0]["id"]
    assert all(r["id"] in kept_ids for r in raw["a_original.txt"])
    assert [ledger.get(r["id"]) for r in raw["b_copy.txt"]] == [("exact_duplicate", original_id)] * len(copy_pieces)
    assert (result.num_exact_duplicates, result.num_near_duplicates) == (len(copy_pieces), 0)
    assert result.invariant_holds() and verify_cleaned_shards(cfg)[0]


def test_pieces_are_documents_keeps_deciding_piece_by_piece(tmp_path, prose, make_cfg):
    """For a collection of short texts (the bundled plays), each piece is a document of its own: the
    copy's pieces that match the original's are removed, the edited one stays."""
    src = tmp_path / "src"
    original = "\n\n".join(prose[:60]) + "\n"
    pieces = pieces_of(original, 8192)
    copy = "".join(reversed_words(p, 25) if k == 1 else p for k, p in enumerate(pieces))
    write_long_pair(src, original, copy, prose)
    cfg = make_cfg([src], corpus={"pieces_are_documents": [str(src / "b_copy.txt"), str(src / "a_original.txt")]})
    build_raw_corpus(cfg, QUIET)
    result = build_cleaned_shards(cfg, QUIET)

    raw = by_source(cfg)
    assert all(r["id"] == r["doc_id"] for rs in raw.values() for r in rs)  # every piece is a document
    ledger = {r["id"]: (r["reason"], r["duplicate_of"]) for r in rows(result.shards_dir.parent / "removed")}
    expected = [("exact_duplicate", a["id"]) for a in raw["a_original.txt"]]
    expected[1] = None  # J < 0.8 with its counterpart: kept
    assert [ledger.get(r["id"]) for r in raw["b_copy.txt"]] == expected
    assert result.invariant_holds() and verify_cleaned_shards(cfg)[0]


def test_the_short_last_piece_of_a_long_document_is_not_a_short_document(tmp_path, prose, make_cfg):
    src = tmp_path / "src"
    src.mkdir()
    cfg = make_cfg([src])
    limit = cfg.corpus.max_document_bytes
    tail = "That is all."  # shorter than cleaning.min_chars and min_words
    body = "\n\n".join(prose[:40]).encode("ascii", "ignore")[:limit - 4].decode().strip()  # fills a piece
    text = body + "\n\n" + tail
    assert pieces_of(text, limit)[-1] == tail
    (src / "long.txt").write_text(text)
    build_raw_corpus(cfg, QUIET)
    result = build_cleaned_shards(cfg, QUIET)
    kept = rows(result.shards_dir)
    assert len(kept) >= 2 and len({r["doc_id"] for r in kept}) == 1
    assert kept[-1]["text"].endswith(tail) and len(kept[-1]["text"]) < cfg.cleaning.min_chars
    assert result.num_filtered == 0 and result.num_kept == len(kept)


def test_verify_detects_a_duplicate_document_with_a_kept_piece(tmp_path, prose, make_cfg):
    cfg = make_cfg([tmp_path / "src"])
    original = "\n\n".join(prose[60:120]) + "\n"
    write_long_pair(tmp_path / "src", original, original.upper(), prose)
    build_raw_corpus(cfg, QUIET)
    result = build_cleaned_shards(cfg, QUIET)
    assert verify_cleaned_shards(cfg)[0]
    # Move one removed piece of the copy back among the kept ones, with counts that agree.
    entry = next(e for e in result.parts if e["num_exact_duplicates"])
    shard, removed = result.shards_dir / entry["name"], result.shards_dir.parent / "removed" / entry["name"]
    ledger = pq.read_table(removed)
    piece_id = ledger.column("id")[0].as_py()
    raw_row = next(r for r in by_source(cfg)["b_copy.txt"] if r["id"] == piece_id)
    kept = pq.read_table(shard)
    pq.write_table(pa.concat_tables([kept, pa.Table.from_pylist([raw_row], schema=kept.schema)]), shard)
    pq.write_table(ledger.slice(1), removed)
    manifest_path = result.shards_dir.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    e = next(e for e in manifest["parts"] if e["name"] == entry["name"])
    e["num_kept"], e["num_exact_duplicates"] = e["num_kept"] + 1, e["num_exact_duplicates"] - 1
    manifest_path.write_text(json.dumps(manifest))
    ok, message = verify_cleaned_shards(cfg)
    assert not ok and "removed as duplicates still have kept pieces" in message
