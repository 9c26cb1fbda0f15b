"""Parquet shards of documents: written incrementally in row groups, each part renamed into place
only when complete, so memory stays bounded and a killed run leaves no half-written part.

A row is a piece of a source document (`id`), and `doc_id` names the source document: its first
piece has `id == doc_id`, the k-th after it `<doc_id>#<k>`. The pieces of a document are
consecutive rows of one part (a part ends only between documents)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from llm_core.faults import hold_point
from llm_core.files import TMP_MARK

DOC_SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("source", pa.string()),
                        ("text", pa.string())])
ROW_GROUP_BYTES = 8 << 20
COMPRESSION = "zstd"  # of every parquet file the stages write


class ShardWriter:
    """Rows in, parquet parts `<prefix>-00000.parquet`, ... of about `target_bytes` of text out.
    With a `doc_id` column, a part ends only where a new document starts."""

    def __init__(self, directory: Path, prefix: str, target_bytes: int, schema: pa.Schema = DOC_SCHEMA):
        self.directory, self.prefix, self.target_bytes, self.schema = directory, prefix, target_bytes, schema
        self.parts: list[str] = []
        self._columns: dict[str, list] = {name: [] for name in schema.names}
        self._buffered_bytes = 0
        self._part_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._last_doc_id: str | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        doc_id = row.get("doc_id")
        if self._part_bytes >= self.target_bytes and (doc_id is None or doc_id != self._last_doc_id):
            self._finish_part()
        self._last_doc_id = doc_id
        for name, values in self._columns.items():
            values.append(row[name])
        size = len(row.get("text") or "")
        self._buffered_bytes += size
        self._part_bytes += size
        if self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._columns[self.schema.names[0]]:
            return
        if self._writer is None:
            name = f"{self.prefix}-{len(self.parts):05d}.parquet"
            self._tmp = self.directory / f"{name}{TMP_MARK}{os.getpid()}"
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression=COMPRESSION)
        self._writer.write_table(pa.table(self._columns, schema=self.schema))
        self._columns = {name: [] for name in self.schema.names}
        self._buffered_bytes = 0

    def _finish_part(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            final = self._tmp.name.split(TMP_MARK)[0]
            hold_point(f"before_rename:{final}")  # tests kill a run here (llm_core/faults.py)
            os.replace(self._tmp, self.directory / final)
            self.parts.append(final)
            self._writer, self._tmp = None, None
        self._part_bytes = 0

    def close(self) -> list[str]:
        """Finish the last part; returns the part file names (none if no rows were added)."""
        self._finish_part()
        return self.parts

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = None


def write_table(path: Path, table: pa.Table) -> None:
    """Write a whole (small) table atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression=COMPRESSION)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def iter_batches(path: Path, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(path).iter_batches(columns=columns, batch_size=batch_size)


def count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows
