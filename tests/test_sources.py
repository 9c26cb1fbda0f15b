"""Source discovery: directories, globs, overlapping sources, fingerprints."""

from __future__ import annotations

from pathlib import Path

from llm_core.data.sources import discover

EXTS = [".txt", ".md", ".jsonl", ".parquet"]



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
