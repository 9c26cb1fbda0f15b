"""Ingest: source discovery, the per-format readers, the bad-input matrix, and build_raw_corpus
(quarantine, empty corpus, incremental shards)."""

from __future__ import annotations

import gzip
import json
import os
import random
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llm_core.data.ingest import BadFile, BadRecord, Doc, ReadOptions, read_source
from llm_core.data.sources import discover, file_kind
from llm_core.data.raw_corpus import EmptyCorpusError, build_raw_corpus

EXTS = [".txt", ".md", ".jsonl", ".parquet"]
DELIM = "\n<|doc|>\n"


def opts(delimiter=None, max_bytes=16384, field="text", column="text") -> ReadOptions:
    return ReadOptions(delimiter, max_bytes, field, column)


def read(path, **kw) -> tuple[list[str], list[BadRecord]]:
    """(document texts, bad records) of one explicitly given file."""
    found = discover([str(path)], EXTS)
    assert not found.missing, found.missing
    assert len(found.files) == 1
    items = list(read_source(found.files[0], opts(**kw)))
    assert all(isinstance(i, (Doc, BadRecord)) for i in items)
    return [i.text for i in items if isinstance(i, Doc)], [i for i in items if isinstance(i, BadRecord)]


def bad_file_reason(path, **kw) -> str:
    with pytest.raises(BadFile) as info:
        read(path, **kw)
    return str(info.value)


def jsonl(records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# ----------------------------------------------------------------------------------------------
# formats


def test_txt_is_one_document_per_file(tmp_path, prose):
    text = prose[0] + "\n\n" + prose[1] + "\n"
    (tmp_path / "a.txt").write_text(text)
    docs, bad = read(tmp_path / "a.txt")
    assert docs == [text] and not bad


def test_txt_with_delimiter_splits_documents(tmp_path, prose):
    (tmp_path / "a.txt").write_text(DELIM.join(prose[:3]) + DELIM + "   \n" + DELIM)
    docs, bad = read(tmp_path / "a.txt", delimiter=DELIM)
    assert [d.strip() for d in docs] == prose[:3]  # whitespace-only pieces are not documents
    assert not bad


def test_long_document_is_cut_at_blank_lines(tmp_path, prose):
    paragraphs = [p for p in prose if len(p.encode()) < 700][:12]
    text = "\n\n".join(paragraphs)
    (tmp_path / "long.md").write_text(text)
    limit = 1024
    assert len(text.encode()) > 3 * limit
    docs, bad = read(tmp_path / "long.md", max_bytes=limit)
    assert not bad and len(docs) >= 3
    assert "".join(docs) == text  # nothing lost, nothing duplicated
    assert all(len(d.encode()) <= limit for d in docs)
    for d in docs[:-1]:
        assert d.endswith("\n\n")  # cut at a blank line...
        assert d.strip().split("\n\n")[-1] in paragraphs  # ...so no paragraph is split


def test_long_document_without_newlines_is_cut_on_character_boundaries(tmp_path):
    text = "héllo wörld ünïcode " * 300
    (tmp_path / "a.txt").write_text(text)
    docs, bad = read(tmp_path / "a.txt", max_bytes=1001)
    assert not bad and len(docs) > 1
    assert "".join(docs) == text and all(len(d.encode()) <= 1001 for d in docs)


def test_long_jsonl_text_field_is_cut_too(tmp_path, prose):
    text = "\n\n".join(prose[:10])
    (tmp_path / "a.jsonl").write_text(jsonl([{"text": text}]))
    docs, bad = read(tmp_path / "a.jsonl", max_bytes=1024)
    assert not bad and len(docs) > 1
    assert "".join(docs) == text and all(len(d.encode()) <= 1024 for d in docs)


def test_pieces_are_numbered_within_their_source_document(tmp_path, prose):
    long = "\n\n".join(prose[:10])  # > 3 pieces of 1024 bytes
    (tmp_path / "a.txt").write_text(DELIM.join([prose[20], long, prose[21]]))
    (tmp_path / "b.jsonl").write_text(jsonl([{"text": prose[20]}, {"text": long}, "{broken", {"text": prose[21]}]))
    write_parquet(tmp_path / "c.parquet", {"text": [prose[20], long, prose[21]]})
    for name, delimiter in (("a.txt", DELIM), ("b.jsonl", None), ("c.parquet", None)):
        found = discover([str(tmp_path / name)], EXTS)
        docs = [i for i in read_source(found.files[0], opts(delimiter=delimiter, max_bytes=1024)) if isinstance(i, Doc)]
        numbers = [d.piece for d in docs]
        assert numbers[0] == 0 and numbers[-1] == 0 and len(numbers) >= 6, name
        assert numbers[1:-1] == list(range(len(numbers) - 2)), name  # the long document: 0, 1, 2, ...
        assert "".join(d.text for d in docs[1:-1]).strip() == long.strip(), name
    found = discover([str(tmp_path / "a.txt")], EXTS)  # without a delimiter the file is one document
    whole_file = [d.piece for d in read_source(found.files[0], opts(max_bytes=1024))]
    assert len(whole_file) >= 5 and whole_file == list(range(len(whole_file)))


def test_markdown_is_read_as_text(tmp_path, prose):
    text = "# Title\n\n" + prose[0]
    (tmp_path / "README.md").write_text(text)
    assert file_kind("README.md") == ("txt", None)
    assert read(tmp_path / "README.md") == ([text], [])


def test_jsonl_with_configurable_field(tmp_path, prose):
    (tmp_path / "a.jsonl").write_text(jsonl([{"content": p, "id": i} for i, p in enumerate(prose[:4])]) + "\n\n")
    docs, bad = read(tmp_path / "a.jsonl", field="content")
    assert docs == prose[:4] and not bad


def test_jsonl_without_trailing_newline(tmp_path, prose):
    (tmp_path / "a.jsonl").write_text(jsonl([{"text": p} for p in prose[:3]]).rstrip("\n"))
    assert read(tmp_path / "a.jsonl") == (prose[:3], [])


def test_parquet_with_configurable_column(tmp_path, prose):
    write_parquet(tmp_path / "a.parquet", {"body": prose[:5], "n": list(range(5))})
    docs, bad = read(tmp_path / "a.parquet", column="body")
    assert docs == prose[:5] and not bad


@pytest.mark.parametrize("suffix, compress", [
    (".gz", gzip.compress),
    (".zst", lambda b: zstandard.ZstdCompressor().compress(b)),
])
@pytest.mark.parametrize("kind", ["txt", "md", "jsonl"])
def test_compressed_variants(tmp_path, prose, kind, suffix, compress):
    if kind == "jsonl":
        payload, kw = jsonl([{"text": p} for p in prose[:3]]), {}
    else:
        payload, kw = DELIM.join(prose[:3]), {"delimiter": DELIM}
    path = tmp_path / f"a.{kind}{suffix}"
    path.write_bytes(compress(payload.encode()))
    assert file_kind(path.name)[1] == {".gz": "gzip", ".zst": "zstd"}[suffix]
    docs, bad = read(path, **kw)
    assert [d.strip() for d in docs] == prose[:3] and not bad


def test_concatenated_zstd_frames_are_all_read(tmp_path, prose):
    c = zstandard.ZstdCompressor()
    data = b"".join(c.compress(jsonl([{"text": p}]).encode()) for p in prose[:3])
    (tmp_path / "a.jsonl.zst").write_bytes(data)
    assert read(tmp_path / "a.jsonl.zst") == (prose[:3], [])


# ----------------------------------------------------------------------------------------------
# discovery


def test_directory_is_read_recursively_with_extension_filter(tmp_path):
    for rel in ["a.txt", "sub/b.md", "sub/deep/c.jsonl", "sub/deep/d.txt.gz", "e.parquet", "x.csv", "sub/y.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = discover([str(tmp_path)], EXTS)
    names = [Path(f.uri).relative_to(tmp_path).as_posix() for f in found.files]
    assert sorted(names) == ["a.txt", "e.parquet", "sub/b.md", "sub/deep/c.jsonl", "sub/deep/d.txt.gz"]
    assert sorted(Path(s).name for s in found.skipped) == ["x.csv", "y.json"]
    assert not found.missing
    only_txt = discover([str(tmp_path)], [".txt"])
    assert sorted(Path(f.uri).name for f in only_txt.files) == ["a.txt", "d.txt.gz"]


def test_globs(tmp_path):
    for rel in ["a.txt", "b.txt", "c.md", "sub/d.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    top = discover([str(tmp_path / "*.txt")], EXTS)
    assert [Path(f.uri).name for f in top.files] == ["a.txt", "b.txt"]
    deep = discover([str(tmp_path / "**" / "*.txt")], EXTS)
    assert sorted(Path(f.uri).name for f in deep.files) == ["a.txt", "b.txt", "d.txt"]
    none = discover([str(tmp_path / "*.jsonl")], EXTS)
    assert none.files == [] and none.missing == [(str(tmp_path / "*.jsonl"), "no files matched")]


def test_overlapping_sources_list_each_file_once(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    found = discover([str(tmp_path), str(tmp_path / "a.txt"), str(tmp_path / "*.txt")], EXTS)
    assert [f.uri for f in found.files] == [str(tmp_path / "a.txt")]


def test_fingerprint_changes_when_the_file_changes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    before = discover([str(path)], EXTS).files[0].fingerprint
    assert discover([str(path)], EXTS).files[0].fingerprint == before
    path.write_text("one two")
    assert discover([str(path)], EXTS).files[0].fingerprint != before


@pytest.fixture
def memory_root():
    fs = fsspec.filesystem("memory")
    root = f"/scratchllm-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_fsspec_memory_uri(memory_root, prose):
    fs, root = memory_root
    fs.pipe(f"{root}/a.txt", prose[0].encode())
    fs.pipe(f"{root}/sub/b.jsonl", jsonl([{"text": prose[1]}]).encode())
    fs.pipe(f"{root}/sub/c.csv", b"x")
    found = discover([f"memory://{root}"], EXTS)
    assert len(found.files) == 2 and all(f.uri.startswith("memory://") for f in found.files)
    assert [Path(s).name for s in found.skipped] == ["c.csv"]
    assert all(f.local_path() is None for f in found.files)
    texts = [d.text for f in found.files for d in read_source(f, opts())]
    assert texts == [prose[0], prose[1]]
    missing = discover([f"memory://{root}/nope.txt"], EXTS)
    assert missing.missing == [(f"memory://{root}/nope.txt", "path not found")]


# ----------------------------------------------------------------------------------------------
# the bad-input matrix, reader by reader


def test_invalid_utf8_record_is_bad_and_neighbours_kept(tmp_path, prose):
    data = prose[0].encode() + DELIM.encode() + b"caf\xe9 \xff\xfe broken" + DELIM.encode() + prose[1].encode()
    (tmp_path / "a.txt").write_bytes(data)
    docs, bad = read(tmp_path / "a.txt", delimiter=DELIM)
    assert docs == [prose[0], prose[1]]
    assert len(bad) == 1 and "invalid UTF-8" in bad[0].reason and b"\xff\xfe" in bad[0].record


def test_invalid_utf8_jsonl_line(tmp_path, prose):
    data = jsonl([{"text": prose[0]}]).encode() + b'{"text": "caf\xe9"}\n'
    (tmp_path / "a.jsonl").write_bytes(data)
    docs, bad = read(tmp_path / "a.jsonl")
    assert docs == [prose[0]]
    assert [b.location for b in bad] == ["line 2"] and "invalid UTF-8" in bad[0].reason


def truncated_gzip(tmp_path, docs: list[str], keep: float = 0.6) -> Path:
    data = gzip.compress(DELIM.join(docs).encode(), compresslevel=1)
    path = tmp_path / "trunc.txt.gz"
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def random_docs(n: int, words: int, seed: int = 0) -> list[str]:
    """Poorly compressible documents: `n` docs of `words` random pseudo-words."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(4000)]
    return [f"doc {i}: " + " ".join(rng.choices(vocab, k=words)) for i in range(n)]


def test_truncated_gzip_keeps_complete_docs_and_reports_the_rest(tmp_path):
    docs = random_docs(400, 1000)  # ~2.6 MB: the break happens after the first read block
    path = truncated_gzip(tmp_path, docs)
    kept, bad = read(path, delimiter=DELIM)
    assert 0 < len(kept) < len(docs)
    assert kept == docs[: len(kept)]  # only complete documents, in order
    assert len(bad) == 1 and "truncated" in bad[0].reason and bad[0].record  # the rest is quarantined


def test_small_truncated_gzip_keeps_complete_docs(tmp_path):
    docs = random_docs(40, 150)  # ~40 KB
    kept, bad = read(truncated_gzip(tmp_path, docs), delimiter=DELIM)
    assert 0 < len(kept) < len(docs) and kept == docs[: len(kept)]
    assert len(bad) == 1 and "truncated" in bad[0].reason


def test_truncated_zstd_is_reported(tmp_path):
    docs = random_docs(60, 1000)  # ~400 KB
    data = zstandard.ZstdCompressor().compress(DELIM.join(docs).encode())
    path = tmp_path / "trunc.txt.zst"
    path.write_bytes(data[: int(len(data) * 0.6)])
    try:
        kept, bad = read(path, delimiter=DELIM)
    except BadFile as exc:
        assert "empty" not in str(exc)
        return
    assert set(kept) <= set(docs)  # no cut-off document passed off as complete
    assert any("truncated" in b.reason for b in bad)


def test_malformed_jsonl_line_and_bad_records(tmp_path, prose):
    lines = [{"text": prose[0]}, '{"text": "unterminated', {"body": "no text field"}, {"text": 42},
             {"text": None}, '["a", "list"]', {"text": prose[1]}]
    (tmp_path / "a.jsonl").write_text(jsonl(lines))
    docs, bad = read(tmp_path / "a.jsonl")
    assert docs == [prose[0], prose[1]]
    reasons = {b.location: b.reason for b in bad}
    assert reasons["line 2"].startswith("malformed JSON")
    assert reasons["line 3"] == "missing field 'text'"
    assert reasons["line 4"] == "field 'text' is int, not a string"
    assert reasons["line 5"] == "field 'text' is NoneType, not a string"
    assert reasons["line 6"] == "record is a JSON list, not an object"
    assert json.loads(bad[1].record) == {"body": "no text field"}  # the record itself is kept for inspection


@pytest.mark.parametrize("name", ["empty.txt", "empty.md", "empty.jsonl", "empty.txt.gz"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"")
    assert bad_file_reason(path) == "empty file"


def test_empty_parquet(tmp_path):
    write_parquet(tmp_path / "e.parquet", {"text": pa.array([], pa.string())})
    assert "empty file" in bad_file_reason(tmp_path / "e.parquet")


@pytest.mark.parametrize("name", ["bin.txt", "bin.jsonl", "bin.md.gz"])
def test_binary_file(tmp_path, name):
    payload = bytes(range(256)) * 64
    (tmp_path / name).write_bytes(gzip.compress(payload) if name.endswith(".gz") else payload)
    assert bad_file_reason(tmp_path / name).startswith("binary file")


def test_missing_path(tmp_path):
    found = discover([str(tmp_path / "nope.txt"), str(tmp_path / "nodir")], EXTS)
    assert found.files == []
    assert found.missing == [(str(tmp_path / "nope.txt"), "path not found"),
                             (str(tmp_path / "nodir"), "path not found")]


def test_empty_directory_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    assert discover([str(tmp_path / "empty")], EXTS).missing == [(str(tmp_path / "empty"), "no files matched")]


def test_parquet_without_the_column(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"body": ["x"], "title": ["y"]})
    assert bad_file_reason(tmp_path / "a.parquet") == "no column 'text' (columns: body, title)"


def test_parquet_with_a_non_string_column(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"text": [1, 2]})
    assert "not a string column" in bad_file_reason(tmp_path / "a.parquet")


def test_parquet_null_value_is_a_bad_record(tmp_path, prose):
    write_parquet(tmp_path / "a.parquet", {"text": [prose[0], None, prose[1]]})
    docs, bad = read(tmp_path / "a.parquet")
    assert docs == [prose[0], prose[1]] and [(b.location, b.reason) for b in bad] == [("row 1", "null 'text'")]


def test_file_that_is_not_parquet(tmp_path):
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    assert bad_file_reason(tmp_path / "fake.parquet").startswith("not a readable parquet file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    path.chmod(0)
    try:
        assert "cannot open" in bad_file_reason(path) or "ermission" in bad_file_reason(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("name", ["data.csv", "data.parquet.gz", "noext"])
def test_unsupported_extension_given_explicitly(tmp_path, name):
    (tmp_path / name).write_text("a,b\n1,2\n")
    found = discover([str(tmp_path / name)], EXTS)
    assert [f.kind for f in found.files] == ["unsupported"] and not found.skipped
    assert bad_file_reason(tmp_path / name).startswith("unsupported file type")


# ----------------------------------------------------------------------------------------------
# build_raw_corpus: quarantine


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
