"""build_raw_corpus: every bad input quarantined and counted, an empty corpus refused, incremental shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard
from helpers import DELIM, jsonl, random_docs, truncated_gzip, write_parquet

from llm_core.data.raw_corpus import EmptyCorpusError, build_raw_corpus


def read_corpus(result) -> list[dict]:
    return [row for part in result.parts for row in pq.read_table(part).to_pylist()]


def quarantine_entries(result) -> list[dict]:
    return [json.loads(line) for f in sorted(result.quarantine_dir.glob("*.jsonl")) for line in f.open()]


def test_build_raw_corpus_quarantines_every_bad_input_and_goes_on(tmp_path, prose, make_cfg):
    src = tmp_path / "src"
    src.mkdir()
    good = prose[:6]
    (src / "good.txt").write_text(DELIM.join(good[:2]))
    (src / "good.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl([{"text": good[2]}]).encode()))
    write_parquet(src / "good.parquet", {"text": [good[3]]})
    (src / "bad_utf8.txt").write_bytes(good[4].encode() + DELIM.encode() + b"\xff\xfe bad bytes")
    (src / "records.jsonl").write_text(jsonl([{"text": good[5]}, '{"text": ', {"body": "x"}, {"text": 3}]))
    (src / "empty.txt").write_bytes(b"")
    (src / "binary.md").write_bytes(b"\x00\x01\x02" * 100)
    write_parquet(src / "nocol.parquet", {"body": ["x"]})
    trunc_docs = random_docs(400, 1000, seed=1)
    trunc = truncated_gzip(src, trunc_docs)
    (src / "notes.csv").write_text("skipped by extension")
    (tmp_path / "explicit.csv").write_text("a,b\n")
    cfg = make_cfg([src, tmp_path / "explicit.csv", tmp_path / "missing.txt"],
                   corpus={"txt_delimiter": DELIM})

    result = build_raw_corpus(cfg, log=lambda msg: None)

    texts = [row["text"] for row in read_corpus(result)]
    assert set(good) <= set(texts)
    kept_trunc = [t for t in texts if t.startswith("doc ")]
    assert 0 < len(kept_trunc) < len(trunc_docs) and set(kept_trunc) <= set(trunc_docs)
    assert result.num_documents == len(texts) == len(good) + len(kept_trunc)
    assert result.num_skipped_files == 1

    entries = quarantine_entries(result)
    by_reason = {(Path(e["source"]).name, e["reason"].split(":")[0]) for e in entries}
    expected = {
        ("bad_utf8.txt", "invalid UTF-8 at byte 0 of the record"),
        ("records.jsonl", "malformed JSON"),
        ("records.jsonl", "missing field 'text'"),
        ("records.jsonl", "field 'text' is int, not a string"),
        ("trunc.txt.gz", f"corrupt or truncated stream after {len(kept_trunc)} documents"),
        ("empty.txt", "empty file"),
        ("binary.md", "binary file (NUL bytes in the first 8 KiB)"),
        ("nocol.parquet", "no column 'text' (columns"),
        ("explicit.csv", "unsupported file type (expected .txt, .md, .jsonl, .parquet, optionally .gz/.zst)"),
        ("missing.txt", "path not found"),
    }
    assert by_reason == expected
    assert result.num_quarantined == len(entries) == len(expected)
    assert result.num_quarantined_records == 5 and result.num_quarantined_files == 5
    assert sum(result.quarantine_reasons.values()) == result.num_quarantined
    # whole bad files are copied for inspection (byte for byte); a missing path has nothing to copy
    copies = {Path(e["source"]).name: e["copy"] for e in entries if e["kind"] == "file"}
    assert copies["missing.txt"] is None
    for name in ("empty.txt", "binary.md", "nocol.parquet"):
        assert Path(copies[name]).parent == result.quarantine_dir / "files"
        assert Path(copies[name]).read_bytes() == (src / name).read_bytes()
    assert Path(copies["explicit.csv"]).read_bytes() == b"a,b\n"
    records = [e for e in entries if e["kind"] == "record"]
    assert all(e["record"] for e in records if "truncated" not in e["reason"]) and trunc.exists()


def test_all_bad_corpus_raises_empty_corpus_error(tmp_path, make_cfg):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.txt").write_bytes(b"")
    (src / "bad.jsonl").write_text('{"nope": 1}\n')
    cfg = make_cfg([src, tmp_path / "gone.txt"])
    with pytest.raises(EmptyCorpusError) as info:
        build_raw_corpus(cfg, log=lambda msg: None)
    message = str(info.value)
    assert "corpus is empty" in message and "3 quarantined" in message
    assert str(cfg.data_path / "quarantine" / "raw_corpus") in message
    assert (cfg.data_path / "quarantine" / "raw_corpus" / "sources.jsonl").exists()


def test_lone_surrogate_in_jsonl_is_quarantined(tmp_path, prose, make_cfg):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(jsonl([{"text": prose[0]}]) + '{"text": "broken \\ud800 text"}\n')
    result = build_raw_corpus(make_cfg([src]), log=lambda msg: None)
    assert result.num_documents == 1 and result.num_quarantined_records == 1


# ----------------------------------------------------------------------------------------------
# build_raw_corpus: incremental shards


def write_file(src: Path, i: int, prose: list[str], n: int = 3, tag: str = "") -> Path:
    path = src / f"f{i}.txt"
    path.write_text(DELIM.join(tag + p for p in prose[3 * i: 3 * i + n]))
    return path


def shards(cfg) -> dict[str, frozenset[str]]:
    """shard id -> the source file names it holds, from the raw_corpus manifest."""
    manifest = json.loads((cfg.data_path / "raw_corpus" / "manifest.json").read_text())
    return {s["id"]: frozenset(Path(f["uri"]).name for f in s["files"]) for s in manifest["shards"]}


def test_incremental_raw_corpus(tmp_path, prose, make_cfg):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        write_file(src, i, prose)
    sizes = [(src / f"f{i}.txt").stat().st_size for i in range(4)]
    # shards of ~1.5 files: {f0, f1}, {f2, f3} (each shard written in several parts)
    cfg = make_cfg([src], corpus={"txt_delimiter": DELIM, "shard_size_mb": 1.5 * max(sizes) / 1e6})
    quiet = lambda msg: None  # noqa: E731

    first = build_raw_corpus(cfg, quiet)
    assert (first.num_shards_built, first.num_shards_reused) == (2, 0)
    assert first.num_documents == 12 and len(first.parts) > 2
    layout = shards(cfg)
    assert sorted(layout.values(), key=sorted) == [{"f0.txt", "f1.txt"}, {"f2.txt", "f3.txt"}]
    # every document of a shard is in one of that shard's parts
    for part in first.parts:
        shard_id = part.name.rsplit("-", 1)[0]
        assert {Path(r["source"]).name for r in pq.read_table(part).to_pylist()} <= layout[shard_id]

    again = build_raw_corpus(cfg, quiet)
    assert (again.num_shards_built, again.num_shards_reused) == (0, 2)
    assert again.parts == first.parts and again.data_version == first.data_version
    mtimes = {p: p.stat().st_mtime_ns for p in first.parts}

    write_file(src, 4, prose)  # a new file: a new shard, the old ones untouched
    added = build_raw_corpus(cfg, quiet)
    assert (added.num_shards_built, added.num_shards_reused) == (1, 2)
    assert added.num_documents == 15 and added.data_version != first.data_version
    assert set(first.parts) < set(added.parts)
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in first.parts)
    assert set(shards(cfg).values()) == set(layout.values()) | {frozenset({"f4.txt"})}

    write_file(src, 2, prose, tag="Changed: ")  # a changed file: only its shard is rebuilt
    before = shards(cfg)
    changed = build_raw_corpus(cfg, quiet)
    assert (changed.num_shards_built, changed.num_shards_reused) == (1, 2)
    after = shards(cfg)
    assert set(after.values()) == set(before.values())
    assert {after[k] for k in set(after) - set(before)} == {frozenset({"f2.txt", "f3.txt"})}
    assert not any(p.exists() for p in set(added.parts) - set(changed.parts))  # stale parts removed
    assert set(added.parts) - set(changed.parts)
    texts = [r["text"] for r in read_corpus(changed)]
    assert len(texts) == 15 and sum(t.startswith("Changed: ") for t in texts) == 3

    (src / "f0.txt").unlink()  # a deleted file: its shard is rebuilt with the survivors
    deleted = build_raw_corpus(cfg, quiet)
    assert (deleted.num_shards_built, deleted.num_shards_reused) == (1, 2)
    assert deleted.num_documents == 12
    assert sorted(shards(cfg).values(), key=sorted) == [{"f1.txt"}, {"f2.txt", "f3.txt"}, {"f4.txt"}]

    reread = make_cfg([src], corpus={"txt_delimiter": DELIM, "shard_size_mb": 1.5 * max(sizes) / 1e6,
                                     "max_document_bytes": 512})
    options_changed = build_raw_corpus(reread, quiet)  # new read options: everything is rebuilt
    assert options_changed.num_shards_reused == 0 and options_changed.num_shards_built == 3


def test_rows_name_their_source_document_and_keep_its_pieces_in_one_part(tmp_path, prose, make_cfg):
    src = tmp_path / "src"
    src.mkdir()
    long = "\n\n".join(prose[:12])
    (src / "a.jsonl").write_text(jsonl([{"text": prose[20]}, "{broken", {"text": long}, {"text": prose[21]}]))
    (src / "b.txt").write_text(long)
    cfg = make_cfg([src], corpus={"max_document_bytes": 1024, "shard_size_mb": 0.002})
    result = build_raw_corpus(cfg, lambda msg: None)
    rows = read_corpus(result)
    by_doc: dict[str, list[dict]] = {}
    for row in rows:
        by_doc.setdefault(row["doc_id"], []).append(row)
    assert result.num_source_documents == len(by_doc) == 4 and result.num_documents == len(rows)
    for doc_id, pieces in by_doc.items():  # the first piece's id is the doc_id, then <doc_id>#1, #2, ...
        assert [r["id"] for r in pieces] == [doc_id] + [f"{doc_id}#{k}" for k in range(1, len(pieces))]
    jsonl_key = by_doc[rows[0]["doc_id"]][0]["id"].rsplit("-", 1)[0]
    assert [d.rsplit("-", 1)[1] for d in by_doc if d.startswith(jsonl_key)] == ["0000000", "0000002", "0000003"]
    long_docs = [pieces for pieces in by_doc.values() if len(pieces) > 1]
    assert len(long_docs) == 2 and all(len(p) >= 4 for p in long_docs)
    assert all(sum(len(r["text"].encode()) for r in pieces) > 2000 for pieces in long_docs)  # > shard_size_mb
    assert len(result.parts) == 3  # parts end at the first document boundary after 2000 bytes, never inside one
    part_of = {row["id"]: part for part in result.parts for row in pq.read_table(part, columns=["id"]).to_pylist()}
    assert all(len({part_of[r["id"]] for r in pieces}) == 1 for pieces in by_doc.values())

    # A collection of short texts: each piece is a document, with the ids it always had.
    collection = make_cfg([src], corpus={"max_document_bytes": 1024, "shard_size_mb": 0.002,
                                         "pieces_are_documents": [str(src / "b.txt")]})
    rebuilt = build_raw_corpus(collection, lambda msg: None)
    assert rebuilt.num_shards_built >= 1  # the option is part of the shard's identity
    text_rows = [r for r in read_corpus(rebuilt) if r["source"].endswith("b.txt")]
    key = text_rows[0]["id"].rsplit("-", 1)[0]
    assert [(r["id"], r["doc_id"]) for r in text_rows] == [(f"{key}-{k:07d}",) * 2 for k in range(len(text_rows))]
    assert rebuilt.num_source_documents == 3 + len(text_rows)


def test_document_ids_do_not_depend_on_where_the_project_is_checked_out(tmp_path):
    from llm_core.config import PROJECT_ROOT
    from llm_core.data.sources import SourceFile

    inside = SourceFile(uri=str(PROJECT_ROOT / "data" / "tinyshakespeare.txt"), size=1, fingerprint="1:1",
                        kind="txt", compression=None)
    outside = SourceFile(uri=str(tmp_path / "a.txt"), size=1, fingerprint="1:1", kind="txt", compression=None)
    remote = SourceFile(uri="s3://bucket/a.txt", size=1, fingerprint="1:e", kind="txt", compression=None)
    assert inside.id_key == "data/tinyshakespeare.txt"  # the same in every clone: same ids, same split
    assert outside.id_key == str(tmp_path / "a.txt") and remote.id_key == "s3://bucket/a.txt"


def test_moving_a_corpus_folder_outside_the_project_keeps_its_document_ids(tmp_path, prose):
    """A user's own folder, outside the project: ids (and with them the train/val split) start from the
    configured folder, so moving it re-splits nothing. A second folder of the same name keeps its files'
    full paths as keys (ids never collide); a glob and a single file start from their own folders."""
    import shutil

    from helpers import make_config

    first = tmp_path / "home" / "texts"
    (first / "sub").mkdir(parents=True)
    (first / "a.txt").write_text(prose[0])
    (first / "sub" / "b.txt").write_text(prose[1])
    (tmp_path / "one.txt").write_text(prose[2])
    sources = lambda folder: [folder, tmp_path / "o*.txt"]  # noqa: E731

    def ids(cfg) -> dict[str, str]:  # text -> doc_id
        return {row["text"]: row["doc_id"] for row in read_corpus(build_raw_corpus(cfg, lambda msg: None))}

    before = ids(make_config(tmp_path / "run1", sources(first)))
    moved = tmp_path / "elsewhere" / "deeper" / "texts"
    moved.parent.mkdir(parents=True)
    shutil.move(first, moved)
    after = ids(make_config(tmp_path / "run2", sources(moved)))
    assert len(set(before.values())) == 3 and after == before

    twin = tmp_path / "twin" / "texts"  # the same folder name and file name, other text
    twin.mkdir(parents=True)
    (twin / "a.txt").write_text(prose[3])
    both = ids(make_config(tmp_path / "run3", [moved, twin]))
    assert both[prose[0]] == before[prose[0]] and len(set(both.values())) == 3
