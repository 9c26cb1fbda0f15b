"""Small file helpers every stage shares: atomic writes, JSON manifests, the quarantine.

Every file a stage produces is written to a temporary name in the same directory and renamed into
place when complete, so a killed run never leaves a half-written file that a later run would read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from llm_core.faults import hold_point

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        hold_point(f"before_rename:{path.name}")  # tests kill a run here (llm_core/faults.py)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def copy_file(source: Path, target: Path) -> None:
    """shutil.copyfile, atomically."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def save_npy(path: Path, array) -> None:
    """np.save, atomically."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def short_hash(payload, length: int = 16) -> str:
    """A short stable hash of bytes, or of JSON-able data (dict keys sorted): cache keys, data
    versions, training identities."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:length]


def write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=1, sort_keys=True))


def write_text(path: Path, text: str) -> None:
    """Path.write_text, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path, default: dict | None = None) -> dict:
    if not path.exists():
        return {} if default is None else default
    return json.loads(path.read_text())


def remove_stale_files(directory: Path, keep: set[str]) -> int:
    """Delete files in `directory` that are not in `keep` (old shards, leftovers of killed runs)."""
    removed = 0
    if directory.is_dir():
        for child in directory.iterdir():
            if child.is_file() and child.name not in keep:
                child.unlink()
                removed += 1
    return removed


class Quarantine:
    """Records (and copies of whole files) that a stage could not use, each with its reason.

    Entries go to `<root>/<name>.jsonl`; whole files are copied under `<root>/files/`. Nothing is
    visible until `commit()`, which renames the log into place atomically.
    """

    MAX_FILE_COPY_BYTES = 64 * 1024 * 1024  # larger bad files are referenced, not copied
    MAX_RECORD_CHARS = 100_000

    def __init__(self, root: Path, name: str):
        self.root = root
        self.name = name
        self.path = root / f"{name}.jsonl"
        self.entries: list[dict] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add_record(self, source: str, reason: str, record: str | bytes, location: str = "") -> None:
        if isinstance(record, bytes):
            record = record.decode("utf-8", errors="backslashreplace")
        self.entries.append(
            {"kind": "record", "source": source, "location": location, "reason": reason,
             "record": record[: self.MAX_RECORD_CHARS], "truncated": len(record) > self.MAX_RECORD_CHARS}
        )

    def add_file(self, source: str, reason: str, local_path: Path | None = None) -> None:
        entry = {"kind": "file", "source": source, "reason": reason, "copy": None}
        if local_path is not None and local_path.is_file() and os.access(local_path, os.R_OK):
            if local_path.stat().st_size <= self.MAX_FILE_COPY_BYTES:
                target = self.root / "files" / f"{self.name}-{len(self.entries):05d}-{local_path.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    shutil.copyfile(local_path, tmp)
                entry["copy"] = str(target)
        self.entries.append(entry)

    def commit(self) -> Path:
        with atomic_path(self.path) as tmp:
            with open(tmp, "w") as fh:
                for entry in self.entries:
                    fh.write(json.dumps(entry) + "\n")
        return self.path

    def reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            key = re.split(r"[:(]| at byte", entry["reason"])[0].strip()  # the kind, without details
            counts[key] = counts.get(key, 0) + 1
        return counts
