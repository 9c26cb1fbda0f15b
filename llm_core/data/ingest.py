"""Read source files as a stream of documents, without holding a whole file in memory.

Each reader yields `Doc` (a document) or `BadRecord` (a record it could not use, with the reason).
A problem with the whole file (empty, binary, unreadable, no such column) raises `BadFile`. A
compressed stream that breaks part-way keeps the documents read so far and quarantines the rest.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from typing import Iterator

import pyarrow.parquet as pq
import zstandard

from llm_core.data.sources import SourceFile, open_binary

READ_BLOCK = 1 << 18  # bytes read at a time from a text stream (also what a broken stream loses)
BINARY_SNIFF = 8192  # a NUL byte in the first bytes marks a binary file


@dataclasses.dataclass
class Doc:
    """One piece of a source document (a file, a delimited part of a .txt, a record or a row): a
    document longer than max_document_bytes is cut into several, numbered 0, 1, ... in order."""

    text: str
    location: str  # where in the file: "piece 3", "line 17", "row 5"
    piece: int = 0  # 0: the first piece of its source document; k: the k-th piece after it


@dataclasses.dataclass
class BadRecord:
    reason: str
    record: str | bytes
    location: str


class BadFile(Exception):
    """The whole file is unusable; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    txt_delimiter: str | None
    max_document_bytes: int
    jsonl_text_field: str
    parquet_text_column: str


def _decompressed(raw, compression: str | None):
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if compression == "zstd":
        return _ZstdStream(raw)
    return raw


class _ZstdStream:
    """Decompressed bytes of concatenated zstd frames. Unlike zstandard's stream_reader, which
    returns b"" when the input ends inside a frame, raises EOFError for a truncated file."""

    def __init__(self, raw):
        self.raw, self.dctx = raw, zstandard.ZstdDecompressor()
        self.dobj, self.in_frame = self.dctx.decompressobj(), False

    def read(self, size: int = -1) -> bytes:
        while chunk := self.raw.read(1 << 16):
            out = []
            while chunk:
                out.append(self.dobj.decompress(chunk))
                self.in_frame = not self.dobj.eof
                chunk = self.dobj.unused_data if self.dobj.eof else b""
                if self.dobj.eof:
                    self.dobj = self.dctx.decompressobj()
            if data := b"".join(out):
                return data
        if self.in_frame:
            raise EOFError("zstd stream ends inside a frame (truncated file)")
        return b""


def _read_blocks(stream) -> Iterator[bytes]:
    """Blocks of decompressed bytes; refuses empty and binary files before yielding anything."""
    # read1: what a broken compressed stream decoded before the break is returned, not dropped
    read = getattr(stream, "read1", stream.read)
    first = read(READ_BLOCK)
    if not first:
        raise BadFile("empty file")
    if b"\x00" in first[:BINARY_SNIFF]:
        raise BadFile("binary file (NUL bytes in the first 8 KiB)")
    yield first
    while block := read(READ_BLOCK):
        yield block


def cut_point(buffer: bytes, limit: int) -> int:
    """Where to cut an oversized document: the last blank line, else the last newline, else a
    UTF-8 character boundary, at or before `limit` bytes."""
    for sep in (b"\n\n", b"\n"):
        pos = buffer.rfind(sep, 0, limit)
        if pos > limit // 4:
            return pos + len(sep)
    pos = limit
    while pos > 0 and (buffer[pos] & 0xC0) == 0x80:  # never split a multi-byte character
        pos -= 1
    return pos or limit


def split_pieces(buffer: bytes, delimiter: bytes | None, limit: int,
                 final: bool) -> tuple[list[tuple[bytes, bool]], bytes]:
    """The complete pieces found in `buffer`, each with whether its document goes on in the next piece
    (it was cut at `limit`, not ended by the delimiter or the end of the input), and the bytes left
    for the next block."""
    pieces: list[tuple[bytes, bool]] = []
    while True:
        end = buffer.find(delimiter) if delimiter else -1
        if 0 <= end <= limit:
            pieces.append((buffer[:end], False))
            buffer = buffer[end + len(delimiter):]
        elif len(buffer) > limit:
            cut = cut_point(buffer, limit)
            pieces.append((buffer[:cut], True))
            buffer = buffer[cut:]
        else:
            break
    if final and buffer:
        pieces.append((buffer, False))
        buffer = b""
    return pieces, buffer


def _decode(piece: bytes, location: str, number: int) -> Doc | BadRecord | None:
    if not piece.strip():
        return None  # blank space between delimiters is not a document
    try:
        return Doc(piece.decode("utf-8"), location, number)
    except UnicodeDecodeError as exc:
        return BadRecord(f"invalid UTF-8 at byte {exc.start} of the record", piece, location)


class _TxtPieces:
    """Decodes the pieces of a .txt stream in order, numbering the pieces of each document."""

    def __init__(self):
        self.index = 0  # pieces seen (their location)
        self.number = 0  # pieces of the current document yielded so far

    def decode(self, pieces: list[tuple[bytes, bool]]) -> Iterator[Doc | BadRecord]:
        for piece, continues in pieces:
            if item := _decode(piece, f"piece {self.index}", self.number):
                yield item
                self.number += isinstance(item, Doc)
            self.index += 1
            if not continues:
                self.number = 0


def read_txt(stream, opts: ReadOptions) -> Iterator[Doc | BadRecord]:
    delimiter = opts.txt_delimiter.encode() if opts.txt_delimiter else None
    buffer, pieces = b"", _TxtPieces()
    try:
        for block in _read_blocks(stream):
            buffer += block
            complete, buffer = split_pieces(buffer, delimiter, opts.max_document_bytes, final=False)
            yield from pieces.decode(complete)
    except (EOFError, OSError, zstandard.ZstdError) as exc:
        if pieces.index == 0 and not buffer:
            raise BadFile(f"unreadable or corrupt stream: {exc}") from exc
        yield BadRecord(f"corrupt or truncated stream after {pieces.index} documents: {exc}", buffer,
                        f"piece {pieces.index}")
        return
    yield from pieces.decode(split_pieces(buffer, delimiter, opts.max_document_bytes, final=True)[0])


def _text_pieces(text: str, limit: int) -> list[str]:
    """A long text field cut like an oversized .txt document."""
    if len(text) <= limit // 4 or len(encoded := text.encode()) <= limit:
        return [text]
    return [p.decode() for p, _ in split_pieces(encoded, None, limit, final=True)[0]]


def read_jsonl(stream, opts: ReadOptions) -> Iterator[Doc | BadRecord]:
    field = opts.jsonl_text_field
    line_no = 0
    pending = b""
    try:
        for block in _read_blocks(stream):
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            for line in lines:
                line_no += 1
                yield from _jsonl_record(line, line_no, field, opts.max_document_bytes)
    except (EOFError, OSError, zstandard.ZstdError) as exc:
        if line_no == 0 and not pending:
            raise BadFile(f"unreadable or corrupt stream: {exc}") from exc
        yield BadRecord(f"corrupt or truncated stream after line {line_no}: {exc}", pending, f"line {line_no + 1}")
        return
    if pending:
        yield from _jsonl_record(pending, line_no + 1, field, opts.max_document_bytes)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _jsonl_record(line: bytes, line_no: int, field: str, limit: int) -> Iterator[Doc | BadRecord]:
    location = f"line {line_no}"
    if not line.strip():
        return
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        yield BadRecord(f"invalid UTF-8 at byte {exc.start} of the line", line, location)
        return
    except json.JSONDecodeError as exc:
        yield BadRecord(f"malformed JSON: {exc.msg} at column {exc.colno}", line, location)
        return
    if not isinstance(record, dict):
        yield BadRecord(f"record is a JSON {type(record).__name__}, not an object", line, location)
    elif field not in record:
        yield BadRecord(f"missing field {field!r}", line, location)
    elif not isinstance(record[field], str):
        yield BadRecord(f"field {field!r} is {type(record[field]).__name__}, not a string", line, location)
    elif not record[field].isascii() and _has_surrogate(record[field]):
        yield BadRecord(f"field {field!r} holds an unpaired UTF-16 surrogate (\\ud800-\\udfff escape)", line, location)
    else:
        for k, piece in enumerate(_text_pieces(record[field], limit)):
            yield Doc(piece, location if k == 0 else f"{location} piece {k}", k)


def read_parquet(stream, opts: ReadOptions) -> Iterator[Doc | BadRecord]:
    column = opts.parquet_text_column
    try:
        parquet = pq.ParquetFile(stream)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise BadFile(f"not a readable parquet file: {exc}") from exc
    names = parquet.schema_arrow.names
    if column not in names:
        raise BadFile(f"no column {column!r} (columns: {', '.join(names)})")
    field_type = parquet.schema_arrow.field(column).type
    if str(field_type) not in ("string", "large_string", "string_view"):
        raise BadFile(f"column {column!r} is {field_type}, not a string column")
    row = 0
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None:
                yield BadRecord(f"null {column!r}", "", f"row {row}")
            else:
                for k, piece in enumerate(_text_pieces(value, opts.max_document_bytes)):
                    yield Doc(piece, f"row {row}" if k == 0 else f"row {row} piece {k}", k)
            row += 1
    if row == 0:
        raise BadFile("empty file (no rows)")


READERS = {"txt": read_txt, "jsonl": read_jsonl, "parquet": read_parquet}


def read_source(source: SourceFile, opts: ReadOptions) -> Iterator[Doc | BadRecord]:
    """Stream the documents of one file. Raises BadFile when the file as a whole is unusable."""
    if source.kind not in READERS:
        raise BadFile("unsupported file type (expected .txt, .md, .jsonl, .parquet, optionally .gz/.zst)")
    try:
        raw = open_binary(source.uri)
    except (OSError, PermissionError) as exc:
        raise BadFile(f"cannot open: {exc}") from exc
    with raw:
        stream = raw if source.kind == "parquet" else _decompressed(raw, source.compression)
        yield from READERS[source.kind](stream, opts)
