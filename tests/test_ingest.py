"""Ingest: the per-format readers and the bad-input matrix, reader by reader (discovery:
test_sources.py; the raw_corpus stage: test_raw_corpus.py)."""

from __future__ import annotations

import gzip
import json
import os
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
import zstandard
from helpers import DELIM, jsonl, random_docs, truncated_gzip, write_parquet

from llm_core.data.ingest import BadFile, BadRecord, Doc, ReadOptions, read_source
from llm_core.data.sources import discover, file_kind

EXTS = [".txt", ".md", ".jsonl", ".parquet"]
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
# reading from a filesystem fsspec knows


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


